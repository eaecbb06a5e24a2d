"""llama.cpp from Python: its conversion script, its GGUF metadata and its file types.

The conversion script and gguf-py come from the llama-cpp-python sdist that
scripts/setup.sh unpacks into the cache; quantization uses the llama.cpp
library compiled into llama-cpp-python (llama_model_quantize).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from quantloop.errors import InputError
from quantloop.paths import CACHE_DIR

GGUF_MAGIC = b"GGUF"


def llama_cpp_version() -> str:
    import llama_cpp  # deferred: llama_cpp

    return llama_cpp.__version__


def source_dir() -> Path:
    d = CACHE_DIR / f"llama.cpp-{llama_cpp_version()}"
    if not (d / "convert_hf_to_gguf.py").is_file():
        raise InputError(d, "llama.cpp sources not found", "run `make setup` (scripts/setup.sh unpacks them)")
    return d


def tools_dir() -> Path:
    """Where scripts/setup.sh builds llama.cpp's command-line tools (llama-quantize, llama-bench, ...)."""
    return CACHE_DIR / f"llama.cpp-{llama_cpp_version()}-build" / "bin"


def tool(name: str) -> Path:
    path = tools_dir() / name
    if not path.is_file():
        raise InputError(path, f"llama.cpp tool {name} is not built", "run `make setup` (scripts/setup.sh builds it once and caches it)")
    return path


def check_gguf_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found", "check the path")
    if not path.is_file():
        raise InputError(path, "not a file", "pass a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise InputError(path, "not a GGUF file (bad magic bytes)", "pass a file written by llama.cpp or quantloop")
    try:
        read_metadata(path)
    except InputError:
        raise
    except Exception as e:
        raise InputError(path, f"corrupt GGUF file ({type(e).__name__}: {str(e)[:120]})", "re-create the file") from None
    return path


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read_value(f, vtype: int, keep: bool):
    """One GGUF metadata value; arrays are skipped (returned as None) unless `keep`."""
    if vtype in _SCALAR:
        fmt = _SCALAR[vtype]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if vtype == 8:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n).decode("utf-8", errors="replace")
    if vtype == 9:
        itype, count = struct.unpack("<IQ", f.read(12))
        if itype in _SCALAR and not keep:
            f.seek(count * struct.calcsize(_SCALAR[itype]), 1)
            return None
        items = [_read_value(f, itype, keep) for _ in range(count)]
        return items if keep else None
    raise ValueError(f"unknown GGUF value type {vtype}")


def padded(n: int, alignment: int) -> int:
    """`n` bytes rounded up to the file's alignment (GGUF pads the header and every tensor's data to it)."""
    return -(-n // alignment) * alignment


class GGUFTensor(NamedTuple):
    """One row of a GGUF file's tensor table. The names are gguf-py's (ReaderTensor), except `type`: the name of
    its tensor_type ("Q4_K", "F32", ...), not the enum."""

    name: str
    type: str
    n_elements: int
    n_bytes: int  # the tensor's data, without the padding to the file's alignment


@dataclass(frozen=True)
class GGUFMetadata:
    """What read_metadata reads from a GGUF file's header."""

    architecture: str | None  # general.architecture
    name: str | None  # general.name
    file_type: int | None  # general.file_type, a gguf.LlamaFileType value (file_type_name names it)
    tensors: list[GGUFTensor]  # in file order
    shapes: dict[str, tuple[int, ...]]  # name -> dims, innermost (row length) first
    offsets: dict[str, int]  # name -> offset of its data from data_offset
    data_offset: int  # bytes before the tensor data (header, metadata, tensor infos, padding)
    header_bytes: int  # the same without the padding
    alignment: int


def read_metadata(path: str | Path) -> GGUFMetadata:
    """Architecture, file type and tensor table (name, type, elements, bytes) of a GGUF file.

    Reads the header only. gguf-py's GGUFReader parses every tokenizer array into
    numpy views, which takes seconds; this skips arrays. Tested against GGUFReader.
    """
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError("bad magic")
        version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        fields = {}
        for _ in range(n_kv):
            (klen,) = struct.unpack("<Q", f.read(8))
            key = f.read(klen).decode("utf-8")
            (vtype,) = struct.unpack("<I", f.read(4))
            fields[key] = _read_value(f, vtype, keep=False)
        tensors, shapes, offsets = [], {}, {}
        for _ in range(n_tensors):
            (nlen,) = struct.unpack("<Q", f.read(8))
            name = f.read(nlen).decode("utf-8")
            (n_dims,) = struct.unpack("<I", f.read(4))
            dims = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
            ttype, offset = struct.unpack("<IQ", f.read(12))
            shapes[name], offsets[name] = dims, offset
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_el = 1
            for d in dims:
                n_el *= d
            tensors.append(GGUFTensor(name, qtype.name, n_el, n_el // block * type_size))
        align = fields.get("general.alignment") or 32
        header_bytes = f.tell()
        data_offset = padded(header_bytes, align)
    return GGUFMetadata(
        architecture=fields.get("general.architecture"), name=fields.get("general.name"),
        file_type=fields.get("general.file_type"), tensors=tensors, shapes=shapes, offsets=offsets,
        data_offset=data_offset, header_bytes=header_bytes, alignment=align,
    )


def file_type_name(file_type: int | None) -> str | None:
    if file_type is None:
        return None
    try:
        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except ValueError:
        return None


def nominal_bits_of(type_name: str | None) -> int | None:
    """Q4_K_M -> 4, Q8_0 -> 8, IQ4_NL -> 4, F16 -> 16, ALL_F32 -> 32."""
    if not type_name:
        return None
    m = re.search(r"(?:^|_)(?:I?Q|TQ)(\d)", type_name)
    if m:
        return int(m.group(1))
    m = re.search(r"(?:BF|F)(16|32)", type_name)
    return int(m.group(1)) if m else None


def convert_hf_to_gguf(hf_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    """Run llama.cpp's convert_hf_to_gguf.py; output goes to a temporary name first."""
    src = source_dir()
    out_file = Path(out_file)
    tmp = out_file.with_name(f".{out_file.name}.tmp-convert")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
            raise InputError(hf_dir, f"llama.cpp cannot convert this checkpoint to GGUF: {last[0][:200]}", "only architectures llama.cpp supports can be converted")
        os.replace(tmp, out_file)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_file


@contextlib.contextmanager
def stderr_to(log_file: Path):
    """Send what the process writes to standard error (llama.cpp's C logging on file descriptor 2, and Python's
sys.stderr, through which llama-cpp-python relays it) into `log_file` meanwhile."""
    # llama-cpp-python drops llama.cpp's messages below its level, which any
    # Llama(verbose=False) sets to ERROR for the whole process
    from llama_cpp._logger import logger  # deferred: llama_cpp
    level = logger.level
    logger.setLevel(logging.DEBUG)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_file, "a") as f, contextlib.redirect_stderr(f):  # llama-cpp-python logs through sys.stderr too
        os.dup2(f.fileno(), 2)
        try:
            yield log_file
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            logger.setLevel(level)


FALLBACK = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")
CONVERTED = re.compile(r"converting to (\w+)")


def fallback_summary(log_text: str) -> str | None:
    """One line for llama.cpp's quantization log ('14 of 20 tensors fell back ...; written as 12 q5_0, 2 q5_1'),
    or None when no tensor fell back."""
    m = FALLBACK.search(log_text)
    if not m:
        return None
    types = Counter(t.group(1) for t in CONVERTED.finditer(log_text))
    written = ", ".join(f"{n} {t}" for t, n in types.most_common())
    return (f"{m.group(1)} of {m.group(2)} tensors fell back to another type (rows their block does not divide); "
            f"quantized tensors written as {written}")
