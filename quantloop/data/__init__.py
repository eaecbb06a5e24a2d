"""Text: datasets and their fixed splits, calibration sequences, self-generated (data-free) text."""
