"""Loraplex server: one frozen base LLM, many LoRA adapters applied per request in one batch."""

__version__ = "0.1.0"
