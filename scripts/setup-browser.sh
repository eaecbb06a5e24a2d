#!/usr/bin/env bash
# Headless Chromium for the browser tests (the run report and the MLflow UI, rendered and checked).
# Installs Debian's `chromium` only when /usr/bin/chromium is missing; otherwise does nothing.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
echo "[setup-browser] installing Debian's chromium (headless browser for the report and MLflow UI tests)" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
"$CHROMIUM" --version >&2
