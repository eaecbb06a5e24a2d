#!/usr/bin/env bash
# Make sure PostgreSQL's server binaries (initdb, pg_ctl) are on this machine, for the two-worker search test
# and for `quantloop search --storage postgresql://...`. Installs Debian's `postgresql` with apt-get only when
# missing; starts nothing (the tests start their own server on 127.0.0.1 in a temporary folder and stop it).
set -euo pipefail
find_bin() {
  command -v initdb >/dev/null 2>&1 && { dirname "$(readlink -f "$(command -v initdb)")"; return 0; }
  for d in /usr/lib/postgresql/*/bin; do [[ -x "$d/initdb" ]] && { echo "$d"; return 0; }; done
  return 1
}
if bin=$(find_bin); then
  echo "[setup-postgres] PostgreSQL server binaries: $bin"
  exit 0
fi
if [[ $(id -u) -ne 0 ]] && ! command -v sudo >/dev/null 2>&1; then
  echo "[setup-postgres] PostgreSQL is missing and this user cannot install it: apt-get install postgresql" >&2
  exit 1
fi
SUDO=$([[ $(id -u) -eq 0 ]] && echo "" || echo sudo)
echo "[setup-postgres] installing Debian's postgresql (apt-get)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
# Debian's package starts a cluster service; the tests do not use it
bin=$(find_bin)
echo "[setup-postgres] PostgreSQL server binaries: $bin"
