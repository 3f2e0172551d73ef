"""gorgon's HTTP server (OpenAI-compatible) and command line."""
