"""One module per quantizer."""
