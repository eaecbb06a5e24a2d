"""Quantization-aware training onto an exact GGUF grid: the backend (backend.py) and its parts; see README.md."""
