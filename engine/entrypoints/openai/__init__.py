"""The OpenAI-compatible HTTP API: request/response models, completions and chat serving,
streaming, errors and the FastAPI app."""
