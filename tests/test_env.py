"""The offline environment is set in one place (quantloop.env) and holds for every entry point."""

import json
import os
import subprocess
import sys

from quantloop.env import OFFLINE_DEFAULTS


def _env_after_import(env: dict) -> dict:
    code = "import os, json, quantloop.pipelines.cli; print(json.dumps({k: os.environ.get(k) for k in %r}))" % list(OFFLINE_DEFAULTS)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_importing_quantloop_sets_every_offline_default():
    clean = {k: v for k, v in os.environ.items() if k not in OFFLINE_DEFAULTS}
    assert _env_after_import(clean) == OFFLINE_DEFAULTS


def test_a_value_the_user_set_is_kept():
    clean = {k: v for k, v in os.environ.items() if k not in OFFLINE_DEFAULTS}
    got = _env_after_import(clean | {"TOKENIZERS_PARALLELISM": "true"})
    assert got["TOKENIZERS_PARALLELISM"] == "true"
    assert got["HF_HUB_OFFLINE"] == "1"
