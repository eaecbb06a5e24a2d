"""Which tensors are the quantized linears, under transformers' names and llama.cpp's: defined once here.

    model.layers.3.self_attn.q_proj   <->   blk.3.attn_q.weight
"""

from __future__ import annotations

import re

from quantloop.errors import InputError

# transformers module name (last part) -> llama.cpp tensor name (middle part), for the decoder's linears
HF_TO_GGUF_LINEAR = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
LINEAR_NAMES = tuple(HF_TO_GGUF_LINEAR)

ATTENTION = r"^blk\.\d+\.attn_(q|k|v|qkv|output)\.weight$"
FEED_FORWARD = r"^blk\.\d+\.ffn_(gate|up|down)(_exps)?\.weight$"
GGUF_LINEAR = re.compile(f"{ATTENTION}|{FEED_FORWARD}")  # a quantized linear weight in a GGUF
HF_LINEAR = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.(weight|qweight)$")
EMBEDDINGS = ("token_embd.weight", "output.weight")


def gguf_tensor_name(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj -> blk.3.attn_q.weight (llama.cpp's name, which precision maps match)."""
    m = re.search(r"layers\.(\d+)\..*?(\w+_proj)$", hf_name)
    if not m or m.group(2) not in HF_TO_GGUF_LINEAR:
        raise InputError(None, f"no llama.cpp tensor name for linear {hf_name}", "quantloop supports Llama-style models")
    return f"blk.{m.group(1)}.{HF_TO_GGUF_LINEAR[m.group(2)]}.weight"


def linear_modules(model) -> list[tuple[str, object]]:
    """(name, nn.Linear) of every q/k/v/o/gate/up/down projection of a transformers model."""
    import torch

    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR_NAMES]
