"""Serving across processes: KV cache transfer between a prefill and a decode instance."""
