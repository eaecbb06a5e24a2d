"""Checkpoints: finding, checking, loading and preparing them (checkpoints.py: HF folders and GGUF files, the
prepared F16 GGUF) and the off-grid twin (offgrid.py: the same network with weights on no quantization grid).
Training a small Llama from scratch is `quantloop train-slm` (quantloop.pipelines.train_slm)."""
