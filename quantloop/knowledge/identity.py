"""Who a checkpoint is, for the knowledge store: its weights' digest, its family (architecture and shapes: a
fine-tune, a training step or the off-grid twin of a model share it) and the role of each sensitivity unit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from quantloop.knowledge.atoms import ModelFact


def weights_digest(hf_dir: Path) -> str:
    """A fingerprint of the weights: every safetensors file's name and size, header, first and last MiB."""
    h = hashlib.sha256()
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
        with open(f, "rb") as fh:  # header + first MiB: names, shapes and the first weights
            h.update(fh.read(1 << 20))
            fh.seek(max(st.st_size - (1 << 20), 0))
            h.update(fh.read())
    return h.hexdigest()[:16]


FAMILY_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads")


def family_of(config: dict) -> str:
    """'llama:L30-H576-I1536-V49152-A9-KV3': the architecture and every shape its tensors follow."""
    text = config.get("text_config", config)  # multimodal configs (Gemma 3) nest the language model's
    arch = text.get("model_type") or config.get("model_type", "unknown")
    short = {"num_hidden_layers": "L", "hidden_size": "H", "intermediate_size": "I", "vocab_size": "V",
             "num_attention_heads": "A", "num_key_value_heads": "KV"}
    return f"{arch}:" + "-".join(f"{short[k]}{text.get(k, '?')}" for k in FAMILY_KEYS)


def model_fact(model) -> ModelFact:
    """The Model fact of a resolved checkpoint (quantloop.models.checkpoints.ResolvedModel with an HF folder)."""
    config = json.loads((model.hf_dir / "config.json").read_text())
    manifest = model.manifest
    name = manifest.name if manifest else Path(model.path).name
    arch = (manifest.architecture if manifest else None) or (config.get("architectures") or [config.get("model_type", "?")])[0]
    return ModelFact(digest=weights_digest(model.hf_dir), name=name, architecture=arch, family=family_of(config),
                     n_params=(manifest.n_params if manifest else 0) or 0)


def role_of(unit: str) -> str:
    """'blk.3.ffn_down' -> 'ffn_down', 'blk.3.attn_q.weight' -> 'attn_q', 'token_embd.weight' -> 'token_embd'."""
    parts = unit.removesuffix(".weight").split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


def layer_of(unit: str) -> int:
    parts = unit.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() else -1
