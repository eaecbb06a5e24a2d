"""Graph assembly, policy and the command-line interface."""
