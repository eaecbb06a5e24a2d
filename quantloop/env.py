"""The process environment quantloop runs under: offline, and quiet where a library would spawn threads.

`offline_defaults()` is the one place these defaults are set; `import quantloop` calls it, so every entry
point (the CLI, the Python API, the MCP server, the tests) runs with them before transformers, datasets or
tokenizers are imported. A value the user set is kept.
"""

from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",  # no model is fetched from a hub
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",  # no tokenizer thread pool fighting torch's after a fork
}


def offline_defaults() -> None:
    """Set OFFLINE_DEFAULTS wherever the environment does not already say otherwise."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
