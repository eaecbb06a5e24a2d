"""The off-grid twin: the same network, with weights on no quantization grid.

The prepared SmolLM2 reference is dequantized from a Q4_1 GGUF (Gemma 3 270M: from Q4_K_M), so its linear
weights lie on a quantization grid and any method that can represent that grid recovers it almost exactly. The
twin moves random per-channel scales s (log-uniform in [low, high]) between parts that cancel exactly, in every
decoder layer (module names from the architecture table, quantloop.gguf.architectures):

- the attention norm's gain * s_attn;  q/k/v (or fused qkv) input columns / s_attn
- the feed-forward norm's gain * s_mlp;  gate/up (or fused gate_up) input columns / s_mlp
- v rows (the v part of a fused qkv) * s_v;  o_proj input columns / s_v of the kv head each query head reads
- up rows (the up half of a fused gate_up) * s_up;  down_proj input columns / s_up

RMSNorm is linear in its gain (Gemma's gain is 1 + w: w becomes (1 + w) * s - 1), attention is linear in V, and
act(gate) * up is linear in up, so the twin computes the same function up to float32 rounding. The embedding,
the head and the final norm are left as they are.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

from quantloop.errors import InputError
from quantloop.fileio import atomic_output, write_json_atomic
from quantloop.gguf.architectures import SUPPORTED, class_name, of_config, read_config
from quantloop.gguf.llamacpp import convert_hf_to_gguf
from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer, save_tokenizer
from quantloop.schemas import ModelManifest

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


def check_offgrid_config(config, where: str | Path | None):
    """The architecture's table entry; InputError when the twin cannot be made for it."""
    arch = of_config(config)
    if arch is None:
        raise InputError(where, f"the off-grid twin has no recipe for architecture {class_name(config)}", f"supported: {SUPPORTED}")
    if (reason := arch.refusal("offgrid")) is not None:
        raise InputError(where, f"the off-grid twin cannot be made for {arch.name}: {reason}", "prepare without --offgrid")
    return arch


def check_scale_range(low: float, high: float) -> None:
    if not (0 < low <= high) or not math.isfinite(high):
        raise InputError(None, f"off-grid scale range [{low}, {high}] is invalid", "use 0 < low <= high, e.g. 0.8 and 1.25")


def log_uniform(n: int, low: float, high: float, generator):
    """n float64 scales, log-uniform in [low, high]."""
    import torch  # deferred: torch

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


def _scale_gain_(norm, s, offset: float) -> None:
    """Multiply a norm's gain (offset + weight) by s."""
    w = norm.weight
    w.copy_(((w.double() + offset) * s - offset).to(w.dtype))


def offgrid_transform_(model, seed: int = 0, low: float = 0.8, high: float = 1.25):
    """Move random per-channel scales through every decoder layer of a model in the architecture table, in place;
    returns the model."""
    import torch  # deferred: torch

    config = model.config
    arch = check_offgrid_config(config, "model config")
    check_scale_range(low, high)
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    group = n_heads // n_kv
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for layer in model.model.layers:
            part = layer.get_submodule
            s_attn = log_uniform(config.hidden_size, low, high, g)
            s_v = log_uniform(n_kv * head_dim, low, high, g)
            s_mlp = log_uniform(config.hidden_size, low, high, g)
            s_up = log_uniform(config.intermediate_size, low, high, g)

            _scale_gain_(part(arch.attn_norm), s_attn, arch.norm_offset)
            for name in arch.qkv:
                _scale_cols_(part(name).weight, 1 / s_attn)

            v = part(arch.qkv[-1])  # v_proj, or the last n_kv * head_dim rows of a fused qkv
            _scale_part_rows_(v, s_v)
            # query head h reads kv head h // group: o_proj column (h, d) undoes s_v[(h // group, d)]
            s_o = s_v.view(n_kv, head_dim).repeat_interleave(group, dim=0).reshape(-1)
            _scale_cols_(part(arch.out).weight, 1 / s_o)

            _scale_gain_(part(arch.mlp_norm), s_mlp, arch.norm_offset)
            for name in arch.gate_up:
                _scale_cols_(part(name).weight, 1 / s_mlp)

            _scale_part_rows_(part(arch.gate_up[-1]), s_up)  # up_proj, or the up half of a fused gate_up
            _scale_cols_(part(arch.down).weight, 1 / s_up)
    return model


def _scale_part_rows_(linear, s) -> None:
    """The last len(s) output rows (and bias) of a linear times s: the whole of v_proj / up_proj, the v part of a
    fused qkv, the up half of a fused gate_up."""
    n = s.shape[0]
    _scale_rows_(linear.weight[-n:], s)
    if linear.bias is not None:
        _scale_vector_(linear.bias[-n:], s)


def logits_of(model, ids):
    import torch  # deferred: torch

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
    """Write the off-grid twin of a prepared checkpoint to out_dir (HF float32, F16 GGUF, manifest)."""
    import torch  # deferred: torch
    from transformers import AutoModelForCausalLM  # deferred: transformers


    reference_dir, out_dir = Path(reference_dir), Path(out_dir)
    if (out_dir / MANIFEST).is_file() and not overwrite:
        return ModelManifest.model_validate_json((out_dir / MANIFEST).read_text())
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(out_dir, "folder exists and was not written by quantloop", "choose another output folder or pass --overwrite")
    config_path = reference_dir / "config.json"
    if not config_path.is_file():
        raise InputError(config_path, "not found", "pass a prepared checkpoint folder")
    config = read_config(config_path)
    check_offgrid_config(config, config_path)
    check_scale_range(low, high)

    tokenizer = load_hf_tokenizer(reference_dir)
    ids = torch.tensor([tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]])
    model = load_hf_model(reference_dir, dtype=torch.float32)
    reference_logits = logits_of(model, ids)
    offgrid_transform_(model, seed, low, high)

    name = out_dir.name
    with atomic_output(out_dir, is_dir=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(reference_dir, tmp)
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
