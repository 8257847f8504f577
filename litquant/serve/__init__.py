"""`litquant serve`: an OpenAI-compatible HTTP server over one model with continuous batching (engine.py: the
batching thread; openai.py: request checks and response objects; app.py: the FastAPI routes)."""
