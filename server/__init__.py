"""Trident HTTP edge: OpenAI-compatible FastAPI app, protocol models, Prometheus metrics, CLI."""
