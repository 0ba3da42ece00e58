"""Text generation: KV cache, sampling, the jitted decode loop, and chat."""
