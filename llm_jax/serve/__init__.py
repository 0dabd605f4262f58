"""Serving: a continuous-batching engine (engine.py, over steps.py's compiled prefill and decode step)
behind an OpenAI-compatible HTTP server (server.py, openai_api.py). See docs/serving.md.

The HTTP side needs the `serve` extra (FastAPI, uvicorn); the engine needs only the core package.
"""
