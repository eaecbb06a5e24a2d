"""The off-grid twin: the same network, with weights on no quantization grid.

The prepared SmolLM2 reference is dequantized from a Q4_1 GGUF, so its linear
weights lie on a 4-bit block-32 asymmetric grid and any method that can
represent that grid recovers it almost exactly. The twin moves random
per-channel scales s (log-uniform in [low, high]) between parts that cancel
exactly, in every decoder layer:

- input_layernorm gain * s_attn;  q/k/v_proj input columns / s_attn
- post_attention_layernorm gain * s_mlp;  gate/up_proj input columns / s_mlp
- v_proj output rows * s_v;  o_proj input columns / s_v of the kv head each query head reads
- up_proj output rows * s_up;  down_proj input columns / s_up

RMSNorm is linear in its gain, attention is linear in V, and SiLU(gate) * up is
linear in up, so the twin computes the same function up to float32 rounding.
The tied embedding / lm_head and the final norm are left as they are.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

from quantloop.errors import InputError
from quantloop.fileio import atomic_output, write_json_atomic
from quantloop.schemas import ModelManifest

SUPPORTED_MODEL_TYPES = {"llama"}
MANIFEST = "quantloop_model.json"
# max |logit(twin) - logit(reference)| allowed, relative to max |logit(reference)|
LOGIT_RTOL = 1e-3

# Real English text (the opening of the US Declaration of Independence, public domain), about 300 tokens.
CHECK_TEXT = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the political bands "
    "which have connected them with another, and to assume among the powers of the earth, the separate and equal "
    "station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of "
    "mankind requires that they should declare the causes which impel them to the separation. We hold these truths "
    "to be self-evident, that all men are created equal, that they are endowed by their Creator with certain "
    "unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. That to secure these "
    "rights, Governments are instituted among Men, deriving their just powers from the consent of the governed, "
    "That whenever any Form of Government becomes destructive of these ends, it is the Right of the People to alter "
    "or to abolish it, and to institute new Government, laying its foundation on such principles and organizing its "
    "powers in such form, as to them shall seem most likely to effect their Safety and Happiness. Prudence, indeed, "
    "will dictate that Governments long established should not be changed for light and transient causes; and "
    "accordingly all experience hath shewn, that mankind are more disposed to suffer, while evils are sufferable, "
    "than to right themselves by abolishing the forms to which they are accustomed."
)

OFFGRID_NOTE = (
    "off-grid twin of {ref}: random per-channel scales (seed {seed}, log-uniform in [{low}, {high}]) moved between "
    "the norm gains and the next linears' input columns, v_proj and o_proj, up_proj and down_proj, so it computes the "
    "same function as the reference (max |dlogit| {diff:.3g} on {n} tokens, {rel:.2g} of the logit scale) while its "
    "weights lie on no quantization grid. Judge quantization quality on this model."
)


def check_llama_config(model_type: str | None, where: str | Path | None) -> None:
    """Refuse anything but a Llama-family config."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(where, f"off-grid transform supports Llama-family models only, not '{model_type}'",
                         "pass a prepared Llama checkpoint such as SmolLM2")


def check_scale_range(low: float, high: float) -> None:
    if not (0 < low <= high) or not math.isfinite(high):
        raise InputError(None, f"off-grid scale range [{low}, {high}] is invalid", "use 0 < low <= high, e.g. 0.8 and 1.25")


def log_uniform(n: int, low: float, high: float, generator):
    """n float64 scales, log-uniform in [low, high]."""
    import torch

    u = torch.rand(n, dtype=torch.float64, generator=generator)
    return torch.exp(math.log(low) + (math.log(high) - math.log(low)) * u)


def _scale_rows_(weight, s) -> None:
    """weight[i, :] *= s[i], computed in float64."""
    weight.copy_((weight.double() * s[:, None]).to(weight.dtype))


def _scale_cols_(weight, s) -> None:
    """weight[:, j] *= s[j], computed in float64."""
    weight.copy_((weight.double() * s[None, :]).to(weight.dtype))


def _scale_vector_(v, s) -> None:
    v.copy_((v.double() * s).to(v.dtype))


def offgrid_transform_(model, seed: int = 0, low: float = 0.8, high: float = 1.25):
    """Move random per-channel scales through every decoder layer of a Llama model, in place; returns the model."""
    import torch

    config = model.config
    check_llama_config(getattr(config, "model_type", None), "model config")
    check_scale_range(low, high)
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    group = n_heads // n_kv
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            s_attn = log_uniform(config.hidden_size, low, high, g)
            s_v = log_uniform(n_kv * head_dim, low, high, g)
            s_mlp = log_uniform(config.hidden_size, low, high, g)
            s_up = log_uniform(config.intermediate_size, low, high, g)

            _scale_vector_(layer.input_layernorm.weight, s_attn)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                _scale_cols_(proj.weight, 1 / s_attn)

            _scale_rows_(attn.v_proj.weight, s_v)
            if attn.v_proj.bias is not None:
                _scale_vector_(attn.v_proj.bias, s_v)
            # query head h reads kv head h // group: o_proj column (h, d) undoes s_v[(h // group, d)]
            s_o = s_v.view(n_kv, head_dim).repeat_interleave(group, dim=0).reshape(-1)
            _scale_cols_(attn.o_proj.weight, 1 / s_o)

            _scale_vector_(layer.post_attention_layernorm.weight, s_mlp)
            for proj in (mlp.gate_proj, mlp.up_proj):
                _scale_cols_(proj.weight, 1 / s_mlp)

            _scale_rows_(mlp.up_proj.weight, s_up)
            if mlp.up_proj.bias is not None:
                _scale_vector_(mlp.up_proj.bias, s_up)
            _scale_cols_(mlp.down_proj.weight, 1 / s_up)
    return model


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        return model(ids, use_cache=False).logits[0].float()


def logit_difference(reference_logits, twin_logits) -> tuple[float, float]:
    """(max |dlogit|, that divided by max |reference logit|)."""
    diff = float((twin_logits - reference_logits).abs().max())
    return diff, diff / max(1.0, float(reference_logits.abs().max()))


def prepare_offgrid(
    reference_dir: Path,
    out_dir: Path,
    seed: int = 0,
    low: float = 0.8,
    high: float = 1.25,
    overwrite: bool = False,
) -> ModelManifest:
    """Write the off-grid twin of a prepared Llama checkpoint to out_dir (HF float32, F16 GGUF, manifest)."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantloop.gguf.llamacpp import convert_hf_to_gguf
    from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer

    reference_dir, out_dir = Path(reference_dir), Path(out_dir)
    if (out_dir / MANIFEST).is_file() and not overwrite:
        return ModelManifest.model_validate_json((out_dir / MANIFEST).read_text())
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(out_dir, "folder exists and was not written by quantloop", "choose another output folder or pass --overwrite")
    config_path = reference_dir / "config.json"
    if not config_path.is_file():
        raise InputError(config_path, "not found", "pass a prepared checkpoint folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(config_path, "not valid JSON", "re-create the checkpoint") from None
    check_llama_config(config.get("model_type"), config_path)
    check_scale_range(low, high)

    tokenizer = load_hf_tokenizer(reference_dir)
    ids = torch.tensor([tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]])
    model = load_hf_model(reference_dir, dtype=torch.float32)
    reference_logits = logits_of(model, ids)
    offgrid_transform_(model, seed, low, high)

    name = out_dir.name
    with atomic_output(out_dir, is_dir=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        n_params = sum(p.numel() for p in model.parameters())
        del model
        twin = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, local_files_only=True).eval()
        diff, rel = logit_difference(reference_logits, logits_of(twin, ids))
        del twin
        if not rel <= LOGIT_RTOL:
            raise RuntimeError(f"off-grid twin of {reference_dir} does not compute the same function: max |dlogit| {diff:.3g} "
                               f"({rel:.3g} of the logit scale, allowed {LOGIT_RTOL:g})")
        gguf_name = f"{name}-f16.gguf"
        convert_hf_to_gguf(tmp, tmp / gguf_name, "f16")
        manifest = ModelManifest(
            name=name,
            source=str(reference_dir),
            hf_dir=".",
            gguf_f16=gguf_name,
            architecture=(config.get("architectures") or [config.get("model_type")])[0],
            n_params=n_params,
            reference_note=OFFGRID_NOTE.format(ref=reference_dir.name, seed=seed, low=low, high=high, diff=diff,
                                               rel=rel, n=ids.shape[1]),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest
