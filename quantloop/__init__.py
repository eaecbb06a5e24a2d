"""quantloop: shrink small language models until they pass an acceptance bar."""

__version__ = "0.1.0"
