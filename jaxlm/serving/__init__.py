"""Serving: a continuous-batching engine over a paged KV cache (the HTTP server is built on it)."""
