"""The gRPC API (pagoda.proto: Generate, Health, ListModels) and its committed stubs."""
