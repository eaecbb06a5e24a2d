"""Measurement: perplexity, KL divergence, speed, size and generation checks."""
