"""Shared building blocks for decoder-only transformers (model-agnostic)."""
