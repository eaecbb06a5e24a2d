"""Print, one per line, the `uv pip install` options (--name=value) that give uv the package sources pip is configured with here.

uv does not read pip's configuration (pip.conf files, PIP_* variables), yet on a machine whose pip is pointed at a
local wheel folder (for example the CPU build of torch) or extra indexes, `uv pip install` must see the same
candidates as `pip install`, or it would resolve something else. Run with the virtual environment's python (it
imports pip); scripts/setup.sh passes the lines to uv. Every index is searched for the best match, as pip does
(--index-strategy unsafe-best-match). A `cert` setting is printed as SSL_CERT_FILE=PATH, for the caller to export.
"""

from __future__ import annotations

import sys


def pip_settings() -> dict[str, str]:
    """pip's effective settings for `pip install`: PIP_* variables over [install] over [global], every file."""
    from pip._internal.configuration import Configuration

    conf = Configuration(isolated=False)
    conf.load()
    merged: dict[str, str] = {}
    for section in ("global", "install", ":env:"):
        for key, value in conf.items():
            s, _, name = key.partition(".")
            if s == section:
                merged[name] = value
    return merged


def uv_options(settings: dict[str, str]) -> list[str]:
    out = ["--index-strategy=unsafe-best-match"]
    if settings.get("index-url"):
        out.append(f"--index-url={settings['index-url']}")
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        out.append("--no-index")
    for option, flag in (("extra-index-url", "--extra-index-url"), ("find-links", "--find-links"),
                         ("constraint", "--constraint"), ("trusted-host", "--allow-insecure-host")):
        out += [f"{flag}={value}" for value in settings.get(option, "").split()]
    if settings.get("cert"):
        out += [f"SSL_CERT_FILE={settings['cert']}"]
    return out


if __name__ == "__main__":
    sys.stdout.write("".join(line + "\n" for line in uv_options(pip_settings())))
