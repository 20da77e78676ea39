"""The OpenAI-compatible HTTP front end (FastAPI on uvicorn, on the gRPC server's asyncio loop)."""
