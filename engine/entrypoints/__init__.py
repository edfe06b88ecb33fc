"""Ways in: the `pagoda` command line, the OpenAI-compatible HTTP server and the gRPC server."""
