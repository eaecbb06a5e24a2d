#!/usr/bin/env bash
# Prepared outputs made once per machine: scripts/prepared-cache.sh NAME PATH... -- COMMAND...
# PATHs are folders under the SLM folder ($QUANTLOOP_SLM_DIR, else SLM/) that COMMAND makes (a `make prepare`,
# `make domains` or `make benchmarks` step). A new clone would make them again (about 3 minutes for the three on
# 2 cores); instead they are copied from $QUANTLOOP_CACHE/prepared/NAME-KEY/, where the first clone on the machine
# stored them. KEY digests everything the outputs are made from: quantloop/'s and specs/' files, the pins
# (requirements.txt, pyproject.toml, scripts/setup.sh: packaged models, llama.cpp version), the scripts behind the
# steps, the Python version and the command; any change there makes a new entry, and the two newest of each NAME
# are kept. COMMAND always runs after the copy, so it checks what was copied (and prints what it prints) and makes
# whatever is still missing. A copied model's manifest names, as its source, the folder it was first prepared from.
# QUANTLOOP_PREPARED_CACHE=0 turns the copy and the store off.
set -euo pipefail
cd "$(dirname "$0")/.."

name=$1; shift
paths=()
while [[ $# -gt 0 && "$1" != "--" ]]; do paths+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
(( $# > 0 )) || { echo "usage: $0 NAME PATH... -- COMMAND..." >&2; exit 2; }

SLM=${QUANTLOOP_SLM_DIR:-SLM}
CACHE=${QUANTLOOP_CACHE:-$HOME/.cache/quantloop}/prepared
missing=()
for p in "${paths[@]}"; do [[ -e "$SLM/$p" ]] || missing+=("$p"); done
if [[ ${#missing[@]} -eq 0 || "${QUANTLOOP_PREPARED_CACHE:-1}" == 0 ]]; then
  exec "$@"
fi

key=$( {
  find quantloop specs -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  sha256sum requirements.txt pyproject.toml scripts/setup.sh scripts/prepare-domains.sh scripts/setup-os-sources.sh \
    scripts/prepared-cache.sh
  "${VENV:-.venv}/bin/python" --version 2>&1 || true
  uname -m
  printf '%s\n' "$name" "${paths[@]}" "$@"
} | sha256sum | cut -c1-16)
entry="$CACHE/$name-$key"

if [[ -f "$entry/.complete" ]]; then
  start=$SECONDS
  for p in "${missing[@]}"; do
    [[ -e "$entry/$p" ]] || continue
    mkdir -p "$(dirname "$SLM/$p")"
    rm -rf "$SLM/$p.cache-copy"
    if cp -a --reflink=auto "$entry/$p" "$SLM/$p.cache-copy"; then
      mv "$SLM/$p.cache-copy" "$SLM/$p"
    else
      rm -rf "$SLM/$p.cache-copy"
    fi
  done
  echo "[prepared] $name: ${missing[*]} copied from $entry ($((SECONDS - start)) s)" >&2
  exec "$@"
fi

"$@"
for p in "${paths[@]}"; do [[ -e "$SLM/$p" ]] || exit 0; done  # stored only when the command made every path
mkdir -p "$CACHE"
tmp=$(mktemp -d "$CACHE/.$name-$key.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
for p in "${paths[@]}"; do
  mkdir -p "$(dirname "$tmp/$p")"
  cp -a --reflink=auto "$SLM/$p" "$tmp/$p"
done
touch "$tmp/.complete"
if mv -T "$tmp" "$entry" 2>/dev/null; then
  echo "[prepared] $name: stored in $entry for the next clone on this machine" >&2
  # the two newest entries of this step are kept
  ls -1dt "$CACHE/$name"-???????????????? 2>/dev/null | tail -n +3 | while read -r old; do rm -rf "$old"; done
fi
