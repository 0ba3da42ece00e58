"""Long-context evaluations: needle in a haystack, passkey retrieval, sliding-window perplexity."""
