"""Checkpoints: loading and preparing them, the off-grid twin, training small Llamas from scratch."""
