"""quantloop: shrink small language models until they pass an acceptance bar."""

from quantloop.env import offline_defaults

__version__ = "0.1.0"

offline_defaults()
