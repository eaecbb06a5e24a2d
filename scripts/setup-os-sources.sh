#!/usr/bin/env bash
# What the OS benchmark's builder needs on the machine: Debian's apt-get and dpkg-deb (to fetch and unpack the
# source packages: pci.ids, usb.ids, core system packages' man pages) and man-db's lexgrog (to parse the man pages'
# NAME lines). Installs man-db only when lexgrog is missing; otherwise does nothing. The packages themselves are
# fetched once by `quantloop prepare --benchmarks` (apt-get download) into ~/.cache/quantloop/os-sources/.
set -euo pipefail

for tool in apt-get dpkg-deb; do
  if ! command -v "$tool" >/dev/null; then
    echo "[setup-os-sources] $tool not found: the OS benchmark is built from Debian packages (a Debian or Ubuntu machine)" >&2
    exit 1
  fi
done
if command -v lexgrog >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
echo "[setup-os-sources] installing man-db (lexgrog parses the man pages' NAME lines for the OS benchmark)" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends man-db >/dev/null
command -v lexgrog >&2
