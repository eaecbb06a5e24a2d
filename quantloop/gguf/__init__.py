"""The deployment format: llama.cpp GGUF block grids and packers, export, llama.cpp tools, precision maps."""
