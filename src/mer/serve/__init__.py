"""The OpenAI-compatible HTTP server (`mer serve`)."""
