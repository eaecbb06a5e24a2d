"""GPTQModel checkpoints after quantization: reload them for CPU inference, read their packed integer codes,
and write those codes into a GGUF (every linear weight exactly scale * (code - zero), fp16 scales, which
quantloop.gguf.export writes block for block, or refuses)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from quantloop.errors import InputError
from quantloop.fileio import read_hf_config
from quantloop.gguf import blocks as gb
from quantloop.gguf.architectures import of_config
from quantloop.gguf.export import export_hf_to_gguf
from quantloop.gguf.tensor_names import gguf_tensor_name
from quantloop.models.checkpoints import load_hf_model, save_tokenizer

DTYPES = ("float32", "float16", "bfloat16")


# GPTQModel 7.6.0's model-loader pool asks for 2 CPU workers: with 1 every load fails ("Virtual pool
# 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"); the workers are threads, so 2 is cheap
MIN_CPU_WORKERS = 2


def set_env() -> None:
    workers = os.environ.get("GPTQMODEL_CPU_WORKERS", "")
    if not workers.isdigit() or int(workers) < MIN_CPU_WORKERS:
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(MIN_CPU_WORKERS)


def safetensors_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        raise InputError(path, "unreadable safetensors header", "re-create the checkpoint") from None
    header.pop("__metadata__", None)
    return header


def weight_files(hf_dir: Path) -> list[Path]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise InputError(hf_dir, "no *.safetensors weights", "save the float model with save_pretrained(safe_serialization=True)")
    return files


def load_gptq(out_dir: Path, dtype: str | None = "float16"):
    """Reload a saved GPTQ/AWQ checkpoint for CPU inference with GPTQModel; returns its model (a GPTQModel wrapper).

    `dtype` is the activation dtype: float16 (default; the precision of the F16
    reference) runs 4-bit GPTQ/AWQ on GPTQModel's int4 CPU kernels
    (TorchAtenLinear / TorchAtenAwqLinear) and 8-bit on TorchLinear, which
    torch.compiles its dequantization on the first calls (tens of seconds, then
    cached by inductor); float32 works for 4-bit only (TorchFusedLinear);
    None lets GPTQModel choose (bfloat16 on CPU).
    """
    out_dir = Path(out_dir)
    if not (out_dir / "quantize_config.json").is_file() and "quantization_config" not in read_hf_config(out_dir):
        raise InputError(out_dir, "not a GPTQ/AWQ checkpoint (no quantize_config.json)", "quantize it first")
    set_env()
    import torch  # deferred: torch
    from gptqmodel import GPTQModel  # deferred: gptqmodel

    if dtype is not None and dtype not in DTYPES:
        raise InputError(None, f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = GPTQModel.load(str(out_dir), device="cpu", **kwargs)
    model.model.eval()
    return model


def gptq_logits(model, ids: list[int]):
    """Float32 logits [len(ids), vocab] of a loaded GPTQ/AWQ model for one token-id sequence."""
    import torch  # deferred: torch

    hf = getattr(model, "model", model)
    with torch.inference_mode():
        out = hf(input_ids=torch.tensor([list(ids)], dtype=torch.long))
    return out.logits[0].float()


def kernel_names(model) -> list[str]:
    """Class names of the quantized linear kernels a loaded model runs (e.g. ['TorchAtenLinear'])."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear  # deferred: gptqmodel

    hf = getattr(model, "model", model)
    return sorted({type(m).__name__ for m in hf.modules() if isinstance(m, BaseQuantLinear)})


# --------------------------------------------------------------------------- read codes, scales, zeros


@dataclass
class QuantizedLinear:
    """One quantized linear as plain tensors: W[o, i] = scales[o, g_idx[i]] * (codes[o, i] - zeros[o, g_idx[i]])."""

    name: str
    method: str          # "gptq" or "awq"
    bits: int
    group_size: int      # -1: one group per row
    symmetric: bool
    codes: "object"      # torch.uint8 [out, in], values 0 .. 2**bits - 1
    scales: "object"     # torch.float16 [out, groups], exactly as saved
    zeros: "object"      # torch.uint8 [out, groups], the integer zero point (2**(bits-1) everywhere when symmetric)
    g_idx: "object"      # torch.int32 [in]

    @property
    def trivial_groups(self) -> bool:
        """True when input column i is in group i // group_size (no act-order permutation)."""
        import torch  # deferred: torch

        gs = self.group_size if self.group_size > 0 else self.codes.shape[1]
        return bool(torch.equal(self.g_idx, torch.arange(self.codes.shape[1], dtype=torch.int32) // gs))

    def dequantize(self):
        """The float32 weight [out, in] the checkpoint stands for."""
        g = self.g_idx.long()
        s = self.scales.float()[:, g]
        z = self.zeros.float()[:, g]
        return s * (self.codes.float() - z)


def _unpack_words(words, bits: int, axis: int):
    """Unpack int32 words holding 32/bits fields each (field j at bits [bits*j, bits*(j+1))) along `axis` (0 or 1)."""
    import torch  # deferred: torch

    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    if axis == 0:  # [rows/per, cols] -> [rows, cols]
        v = (w.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)
        return v.reshape(w.shape[0] * per, w.shape[1])
    v = (w.unsqueeze(2) >> shifts.view(1, 1, per)) & ((1 << bits) - 1)
    return v.reshape(w.shape[0], w.shape[1] * per)


def _quant_config(out_dir: Path) -> dict:
    path = out_dir / "quantize_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    qc = read_hf_config(out_dir).get("quantization_config")
    if not qc:
        raise InputError(out_dir, "not a GPTQ/AWQ checkpoint (no quantize_config.json)", "quantize it first")
    return qc


def quantized_linear_names(out_dir: Path) -> list[str]:
    """Names of every quantized linear (the prefix of its .qweight tensor) in a saved checkpoint."""
    names = []
    for f in weight_files(Path(out_dir)):
        names += [k.removesuffix(".qweight") for k in safetensors_header(f) if k.endswith(".qweight")]
    return sorted(names)


def read_quantized_linear(out_dir: Path, name: str) -> QuantizedLinear:
    """Integer codes, float16 scales and integer zero points of one quantized linear, read from the safetensors.

    `name` is the module path, e.g. "model.layers.0.self_attn.q_proj".
    Supports GPTQ ("gptq" v1 format) and AWQ ("gemm" format) at 2, 4 or 8 bits.
    """
    import torch  # deferred: torch
    from safetensors import safe_open  # deferred: safetensors

    out_dir = Path(out_dir)
    qc = _quant_config(out_dir)
    bits, group_size = int(qc["bits"]), int(qc["group_size"])
    method = str(qc.get("quant_method") or qc.get("method")).lower()
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or qc.get("version")).lower()
    sym = bool(qc.get("sym", not qc.get("zero_point", True)))
    if bits not in (2, 4, 8):
        raise InputError(out_dir, f"reading {bits}-bit codes is not supported (their words straddle fields)",
                         "use 2, 4 or 8 bits")
    if (method, fmt) not in (("gptq", "gptq"), ("awq", "gemm")):
        raise InputError(out_dir, f"unsupported checkpoint layout {method}/{fmt}", "write GPTQ 'gptq' or AWQ 'gemm' checkpoints")
    tensors = {}
    for f in weight_files(out_dir):
        with safe_open(str(f), framework="pt") as st:
            for suffix in ("qweight", "qzeros", "scales", "g_idx"):
                key = f"{name}.{suffix}"
                if key in st.keys():
                    tensors[suffix] = st.get_tensor(key)
    if "qweight" not in tensors:
        raise InputError(out_dir, f"no quantized linear named {name!r}", "see quantized_linear_names()")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    per = 32 // bits
    if method == "gptq":
        codes = _unpack_words(qweight, bits, axis=0).T          # [out, in]
        offset = sum(1 << (bits * j) for j in range(per))        # v1: zero - 1 on the whole word
        zeros = _unpack_words((qzeros.to(torch.int64) + offset) & 0xFFFFFFFF, bits, axis=1)
        zeros = zeros[:, : scales.shape[1]].T                    # [out, groups]
        g_idx = tensors.get("g_idx")
        in_f = codes.shape[1]
        if g_idx is None:
            gs = group_size if group_size > 0 else in_f
            g_idx = torch.arange(in_f, dtype=torch.int32) // gs
    else:
        out_f = scales.shape[1]
        codes = _unpack_words(qweight, bits, axis=1)             # [in, out] in packed order
        zeros = _unpack_words(qzeros, bits, axis=1)              # [groups, out] in packed order
        if bits == 4:
            order = torch.arange(codes.shape[1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
            codes, zeros = codes[:, order], zeros[:, order]
        codes, zeros = codes[:, :out_f].T, zeros[:, :out_f].T
        in_f = codes.shape[1]
        gs = group_size if group_size > 0 else in_f
        g_idx = torch.arange(in_f, dtype=torch.int32) // gs
    return QuantizedLinear(name=name, method=method, bits=bits, group_size=group_size, symmetric=sym,
                           codes=codes.to(torch.uint8).contiguous(), scales=scales.T.contiguous(),
                           zeros=zeros.to(torch.uint8).contiguous(), g_idx=g_idx.to(torch.int32))


def join_rows(name: str, parts: list[QuantizedLinear]) -> QuantizedLinear:
    """One linear from the parts GPTQModel defused it into (Phi-3's gate_up_proj -> gate_proj, up_proj): their
    output rows stacked in order, each row keeping its own codes, scales and zero points."""
    import torch  # deferred: torch

    first = parts[0]
    if any(not torch.equal(p.g_idx, first.g_idx) for p in parts):
        raise ValueError(f"{name}: its defused parts group their input columns differently; no one GGUF tensor holds that")
    return QuantizedLinear(name=name, method=first.method, bits=first.bits, group_size=first.group_size,
                           symmetric=first.symmetric, g_idx=first.g_idx,
                           **{k: torch.cat([getattr(p, k) for p in parts]) for k in ("codes", "scales", "zeros")})


def table_linears(gptq_dir: Path, arch) -> list[QuantizedLinear]:
    """Every quantized linear of a checkpoint under the architecture table's names: the parts of a linear GPTQModel
    defused (arch.defused) joined back into it."""
    defused = {part: (fused, parts) for fused, parts in (arch.defused if arch else ()) for part in parts}
    out, joined = [], set()
    for name in quantized_linear_names(gptq_dir):
        prefix, module = re.fullmatch(r"(.*\.layers\.\d+\.)(.*)", name).groups()
        if module not in defused:
            out.append(read_quantized_linear(gptq_dir, name))
        elif (fused := prefix + defused[module][0]) not in joined:
            joined.add(fused)
            out.append(join_rows(fused, [read_quantized_linear(gptq_dir, prefix + p) for p in defused[module][1]]))
    return out


def changed_float_tensors(gptq_dir: Path, float_dir: Path) -> dict:
    """The unquantized tensors the quantizer rewrote: AWQ folds its input scales into the norm before q/k/v and
    gate/up (norm / s, W * s). The checkpoint stores every float tensor in float16; one that is not the float
    model's own tensor rounded to float16 was changed, and the checkpoint's is the model's."""
    import torch  # deferred: torch
    from safetensors import safe_open  # deferred: safetensors

    def tensors(folder: Path) -> dict:
        out = {}
        for f in weight_files(Path(folder)):
            with safe_open(str(f), framework="pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
        return out

    originals = tensors(float_dir)
    return {k: v.float() for k, v in tensors(gptq_dir).items()
            if k in originals and v.is_floating_point() and not torch.equal(v.half(), originals[k].half())}


def on_grid_model(gptq_dir: Path, float_dir: Path, gguf_type: str):
    """The float transformers model a GPTQModel checkpoint stands for, as `gguf_type` blocks hold it: every quantized
    linear's codes and scales packed into blocks (a zero point becomes Q4_1/Q5_1's fp16 offset m = -scale * zero,
    the one rounding on the way) and the weight set to what they dequantize to; the tensors the quantizer rewrote
    (AWQ's norms) from the checkpoint. Returns (model, {GGUF tensor name: (gguf_type, QuantBlocks)})."""
    import torch  # deferred: torch


    model = load_hf_model(Path(float_dir))
    params = dict(model.named_parameters())
    blocks = {}
    with torch.no_grad():
        for name, value in changed_float_tensors(gptq_dir, float_dir).items():
            params[name].copy_(value)
        for q in table_linears(gptq_dir, of_config(model.config)):
            if not q.trivial_groups:
                raise ValueError(f"{q.name}: act-order permutes groups; no GGUF block type holds that")
            zeros = None if q.symmetric else q.zeros.numpy()
            raw = gb.pack_from_codes(q.codes.numpy(), q.scales.numpy(), gguf_type, zeros, q.group_size)
            blocks[gguf_tensor_name(q.name)] = (gguf_type, gb.unpack(raw, gguf_type))
            params[f"{q.name}.weight"].copy_(torch.from_numpy(gb.dequantize(raw, gguf_type)))
    return model, blocks


def export_gptq_to_gguf(gptq_dir: Path, float_dir: Path, out_file: Path, gguf_type: str, report: dict | None = None) -> Path:
    """Write the codes and scales of a GPTQModel checkpoint into a GGUF of `gguf_type` as they are (packed by
    pack_from_codes, see on_grid_model), or refuse. The float checkpoint the converter reads holds exactly what the
    blocks dequantize to."""
    model, blocks = on_grid_model(gptq_dir, float_dir, gguf_type)
    with tempfile.TemporaryDirectory(dir=Path(out_file).parent, prefix=".gptq-float-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(Path(float_dir), Path(tmp))
        return export_hf_to_gguf(Path(tmp), out_file, gguf_type, blocks=blocks, report=report)
