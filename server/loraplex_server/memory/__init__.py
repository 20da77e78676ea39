"""Device memory shared by the KV cache and the LoRA weights (the unified page pool)."""
