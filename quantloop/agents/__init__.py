"""LangGraph agents (Evaluation, Quantization, Reviewer)."""
