"""GPTQ/AWQ checkpoints onto the GGUF grid: dequantize the saved integer codes into a
float checkpoint (every linear weight exactly scale * (code - zero), fp16 scales),
which quantloop.gguf.export then writes block for block."""

from __future__ import annotations

import tempfile
from pathlib import Path

from quantloop.backends.gptq import quantized_linear_names, read_quantized_linear


def export_gptq_to_gguf(gptq_dir: Path, float_dir: Path, out_file: Path, gguf_type: str) -> Path:
    """Write the codes of a GPTQModel checkpoint into a GGUF of `gguf_type` (exact, or refused)."""
    import torch

    from quantloop.gguf.export import export_hf_to_gguf
    from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer

    model = load_hf_model(Path(float_dir))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in quantized_linear_names(gptq_dir):
            q = read_quantized_linear(gptq_dir, name)
            if not q.trivial_groups:
                raise ValueError(f"{name}: act-order permutes groups; no GGUF block type holds that")
            params[f"{name}.weight"].copy_(q.dequantize())
    with tempfile.TemporaryDirectory(dir=Path(out_file).parent, prefix=".gptq-float-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        load_hf_tokenizer(Path(float_dir)).save_pretrained(tmp)
        return export_hf_to_gguf(Path(tmp), out_file, gguf_type)
