"""Tests of the servers: AsyncEngine, the OpenAI HTTP API, gRPC, the CLI and the serving benchmark."""
