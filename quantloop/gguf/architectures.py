"""One small table per model architecture: everything quantloop needs to know about it, in one place.

Each entry says what transformers calls the model, which decoder-layer linears are quantized and what llama.cpp's
converter (convert_hf_to_gguf.py of the bundled llama.cpp) names them, whether the converter reorders rows, the
norm convention, the head, and which quantloop steps run on it. Every module that needs such a fact reads it here.

    Llama     LlamaForCausalLM    q/k/v/o, gate/up/down   converter permutes q and k rows (LlamaModel.permute)
    Qwen2     Qwen2ForCausalLM    q/k/v (+ bias), o, ...  no permutation
    Qwen3     Qwen3ForCausalLM    q/k/v, o, ... q/k norms no permutation
    Gemma 3   Gemma3ForCausalLM   q/k/v/o, gate/up/down   gain 1 + w (the converter writes w + 1), four norms a layer
    Phi-3     Phi3ForCausalLM     qkv (fused), o, gate_up (fused: gate rows then up rows), down

GPTQModel saves Phi-3's gate_up_proj as gate_proj and up_proj (`defused`); the GGUF export stacks their rows
back. GPTQModel's AWQ cannot run on Gemma 3 or Phi-3 (`refused`, with the reason).

Row permutations only reorder whole rows, so the exact export matches a quantizer's blocks to the converted
tensor row for row (quantloop.gguf.export); the permutation flag is documentation and a check, not a code path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gguf.constants import MODEL_ARCH_NAMES

from quantloop.errors import InputError
from quantloop.gguf.llamacpp import read_metadata, source_dir
from quantloop.schemas.quant_spec import METHODS

# quantloop's steps: the quantization methods (QuantSpec's) and the off-grid twin
STEPS = (*METHODS, "offgrid")
# what a config.json must give for any step to read the model's shapes
REQUIRED_CONFIG = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass(frozen=True)
class Architecture:
    name: str  # what people call it
    hf_class: str  # config.json "architectures"[0]
    model_types: tuple[str, ...]  # config.json "model_type" values
    gguf_arch: str  # general.architecture the converter writes
    qkv: tuple[str, ...]  # q, k, v projections in a decoder layer (one name: fused q|k|v rows)
    out: str  # attention output projection
    gate_up: tuple[str, ...]  # gate and up projections (one name: fused gate|up rows)
    down: str
    gguf_names: tuple[tuple[str, str], ...]  # decoder-layer module -> llama.cpp tensor name (middle part)
    attn_norm: str  # the norm whose output the q/k/v projections read
    mlp_norm: str  # the norm whose output the gate/up projections read
    norm_offset: float = 0.0  # an RMSNorm's gain is norm_offset + weight
    permuted_qk: bool = False  # the converter permutes q and k rows (rotary pairs)
    tied_head: bool | None = None  # True: the head is the token embedding; None: as config.tie_word_embeddings says
    refused: tuple[tuple[str, str], ...] = ()  # step -> why it cannot run on this architecture
    # a fused linear -> the linears GPTQModel defuses it into and saves, whose rows stack into it in this order
    defused: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        """The quantized linears of a decoder layer, in order."""
        return (*self.qkv, self.out, *self.gate_up, self.down)

    def gguf_name(self, module: str) -> str:
        return dict(self.gguf_names)[module]

    def refusal(self, step: str) -> str | None:
        return dict(self.refused).get(step)

    def steps_line(self) -> str:
        """One line: which steps run on this architecture and which are refused, with the reason."""
        runs = [s for s in STEPS if self.refusal(s) is None]
        out = f"{self.name} ({self.hf_class}): runs {', '.join(runs)}"
        return out + "".join(f"; {s} refused: {r}" for s, r in self.refused)


LLAMA_NAMES = (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
               ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
               ("mlp.down_proj", "ffn_down"))
LLAMA_LAYOUT = dict(qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), out="self_attn.o_proj",
                    gate_up=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj", gguf_names=LLAMA_NAMES,
                    attn_norm="input_layernorm", mlp_norm="post_attention_layernorm")

ARCHITECTURES = (
    Architecture("Llama", "LlamaForCausalLM", ("llama",), "llama", permuted_qk=True, **LLAMA_LAYOUT),
    Architecture("Qwen2", "Qwen2ForCausalLM", ("qwen2",), "qwen2", **LLAMA_LAYOUT),
    Architecture("Qwen3", "Qwen3ForCausalLM", ("qwen3",), "qwen3", **LLAMA_LAYOUT),
    Architecture("Gemma 3", "Gemma3ForCausalLM", ("gemma3_text",), "gemma3", norm_offset=1.0, tied_head=True,
                 refused=(("awq", "GPTQModel 7.6.0's AWQ scale search calls Gemma 3's rotary embedding without its "
                                  "layer_type argument and stops in layer 0 (TypeError)"),),
                 **(LLAMA_LAYOUT | dict(mlp_norm="pre_feedforward_layernorm"))),
    Architecture("Phi-3", "Phi3ForCausalLM", ("phi3",), "phi3", qkv=("self_attn.qkv_proj",), out="self_attn.o_proj",
                 gate_up=("mlp.gate_up_proj",), down="mlp.down_proj",
                 gguf_names=(("self_attn.qkv_proj", "attn_qkv"), ("self_attn.o_proj", "attn_output"),
                             ("mlp.gate_up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")),
                 attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                 defused=(("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),),
                 refused=(("awq", "GPTQModel 7.6.0's Phi-3 definition names no norms, so AWQ finds no scaling groups "
                                  "and stops packing qkv_proj (KeyError 'q_zeros')"),)),
)
BY_CLASS = {a.hf_class: a for a in ARCHITECTURES}
BY_MODEL_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}
BY_GGUF_ARCH = {a.gguf_arch: a for a in ARCHITECTURES}
SUPPORTED = ", ".join(a.hf_class for a in ARCHITECTURES)
# every decoder-layer module name any architecture quantizes (last part) -> llama.cpp name; they never disagree
LINEAR_LEAVES = {m.rsplit(".", 1)[-1]: g for a in ARCHITECTURES for m, g in a.gguf_names}


def lookup(hf_class: str | None = None, model_type: str | None = None) -> Architecture | None:
    return BY_CLASS.get(hf_class or "") or BY_MODEL_TYPE.get(model_type or "")


def _getter(config):
    return config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))


def of_config(config) -> Architecture | None:
    """The table entry of a transformers config (object or dict), or None when quantloop has none."""
    get = _getter(config)
    return lookup((get("architectures") or [None])[0], get("model_type"))


def of_gguf_arch(gguf_arch: str) -> Architecture | None:
    return BY_GGUF_ARCH.get(gguf_arch)


def read_config(config_path: Path) -> dict:
    try:
        config = json.loads(Path(config_path).read_text())
    except FileNotFoundError:
        raise InputError(config_path, "not found", "pass a checkpoint folder with config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(config_path, "not valid JSON", "re-create the checkpoint") from None
    if not isinstance(config, dict):
        raise InputError(config_path, "not a JSON object", "re-create the checkpoint")
    return config


def class_name(config) -> str:
    """The architecture a config (object or dict) names: its class, else its model type."""
    get = _getter(config)
    return (get("architectures") or [None])[0] or get("model_type") or "(none named)"


def check_config(config_path: Path, step: str) -> Architecture | None:
    """Refuse, before any work, a checkpoint that `step` cannot handle: a config without an architecture or
    without the shapes every step reads, or an architecture not in the table or refused by the step. llama.cpp's
    own quantizers ("gguf") run on whatever the bundled llama.cpp converts and loads: no table entry needed."""
    config = read_config(config_path)
    if not config.get("architectures") and not config.get("model_type"):
        raise InputError(config_path, "names no architecture (no 'architectures' and no 'model_type')",
                         "save the checkpoint with transformers' save_pretrained")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    missing = [k for k in REQUIRED_CONFIG if k not in text and k not in config]
    if missing:
        raise InputError(config_path, f"config lacks {', '.join(missing)}", "save the checkpoint with transformers' save_pretrained")
    arch = of_config(config)
    if step == "gguf":
        return arch
    if arch is None:
        raise InputError(config_path, f"architecture {class_name(config)} is not supported by {step}",
                         f"supported: {SUPPORTED}; llama.cpp's own types (method gguf) run on any architecture it converts")
    if (reason := arch.refusal(step)) is not None:
        raise InputError(config_path, f"{step} cannot quantize {arch.name}: {reason}", "use another method")
    return arch


@lru_cache(maxsize=1)
def llama_cpp_converts() -> frozenset[str]:
    """The transformers classes the bundled convert_hf_to_gguf.py registers (read from its sources)."""
    src = source_dir()
    names: set[str] = set()
    for f in [src / "convert_hf_to_gguf.py", *sorted((src / "conversion").glob("*.py"))]:
        for args in re.findall(r"@ModelBase\.register\(([^)]*)\)", f.read_text(errors="replace")):
            names.update(re.findall(r"[\"']([\w.]+)[\"']", args))
    return frozenset(names)


def llama_cpp_loads() -> frozenset[str]:
    """GGUF architecture names (general.architecture) the llama.cpp build's gguf-py knows."""
    return frozenset(MODEL_ARCH_NAMES.values())


def steps_line_for(hf_class: str | None = None, gguf_arch: str | None = None) -> str:
    """Which steps run on a model, said before any work (quantloop prepare prints it)."""
    arch = lookup(hf_class) if hf_class else of_gguf_arch(gguf_arch or "")
    if arch is not None:
        return arch.steps_line()
    named = hf_class or gguf_arch
    return (f"{named}: runs gguf (llama.cpp's own types) only; rtn, gptq, awq, autoround, qat and offgrid refused: "
            f"quantloop has no table for it (supported: {SUPPORTED})")


def check_gguf_architecture(path: Path) -> str:
    """The GGUF's general.architecture; InputError when the bundled llama.cpp does not know it."""
    arch = read_metadata(path).architecture
    if arch not in llama_cpp_loads():
        raise InputError(path, f"llama.cpp cannot load GGUF architecture '{arch}'",
                         f"pass a GGUF of an architecture llama.cpp supports, e.g. {', '.join(a.gguf_arch for a in ARCHITECTURES)}")
    return arch
