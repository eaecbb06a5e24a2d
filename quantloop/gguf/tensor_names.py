"""Which tensors are the quantized linears, under transformers' names and llama.cpp's: read from the architecture
table (quantloop.gguf.architectures), defined nowhere else.

    model.layers.3.self_attn.q_proj     <->   blk.3.attn_q.weight
    model.layers.3.self_attn.qkv_proj   <->   blk.3.attn_qkv.weight   (Phi-3)
    model.layers.3.mlp.gate_up_proj     <->   blk.3.ffn_up.weight     (Phi-3)
"""

from __future__ import annotations

import re

from quantloop.errors import InputError
from quantloop.gguf.architectures import LINEAR_LEAVES, SUPPORTED, of_config

# transformers module name (last part) -> llama.cpp tensor name (middle part), for every architecture's linears
HF_TO_GGUF_LINEAR = dict(LINEAR_LEAVES)
LINEAR_NAMES = tuple(HF_TO_GGUF_LINEAR)

ATTENTION = r"^blk\.\d+\.attn_(q|k|v|qkv|output)\.weight$"
FEED_FORWARD = r"^blk\.\d+\.ffn_(gate|up|down)(_exps)?\.weight$"
GGUF_LINEAR = re.compile(f"{ATTENTION}|{FEED_FORWARD}")  # a quantized linear weight in a GGUF
_LEAVES = "|".join(sorted(LINEAR_NAMES, key=len, reverse=True))
HF_LINEAR = re.compile(rf"layers\.\d+\.(self_attn|mlp)\.({_LEAVES})\.(weight|qweight)$")
EMBEDDINGS = ("token_embd.weight", "output.weight")


def gguf_tensor_name(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj -> blk.3.attn_q.weight (llama.cpp's name, which precision maps match)."""
    m = re.search(r"layers\.(\d+)\..*?(\w+_proj)$", hf_name)
    if not m or m.group(2) not in HF_TO_GGUF_LINEAR:
        raise InputError(None, f"no llama.cpp tensor name for linear {hf_name}", f"supported: {SUPPORTED}")
    return f"blk.{m.group(1)}.{HF_TO_GGUF_LINEAR[m.group(2)]}.weight"


def linear_modules(model) -> list[tuple[str, object]]:
    """(name, nn.Linear) of every quantized decoder-layer projection of a transformers model: the linears its
    architecture's table entry names (any known architecture's names when the config names none in the table)."""
    import torch  # deferred: torch

    arch = of_config(getattr(model, "config", None) or {})
    leaves = {m.rsplit(".", 1)[-1] for m in arch.linears} if arch else set(LINEAR_NAMES)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in leaves]
