"""Bundled assets: the tiny default model used by demos, examples and tests."""

import os

TINY_DIR = os.path.join(os.path.dirname(__file__), "tiny")
