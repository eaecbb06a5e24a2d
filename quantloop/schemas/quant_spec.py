"""One quantization attempt's settings: one model per method, chosen by its `method` (a discriminated union).

Every method has SpecBase's fields (bits, group size, symmetry, GGUF type, calibration, seed) and owns the ones
it applies:

    GGUFSpec       gguf       llama.cpp's quantizers: imatrix, a precision map (preset, layer_types, gguf_tensor_types)
    RTNSpec        rtn        round-to-nearest per group
    GPTQSpec       gptq       act_order, a precision map, a size budget (min_size_ratio)
    AWQSpec        awq        (nothing of its own)
    AutoRoundSpec  autoround  skip_modules
    QATSpec        qat        qat_steps, qat_init, qat_max_minutes, a precision map, a size budget

What depends on the method is a method of its model (needs, uses_calibration, has_precision_map, tag, ...),
never a test of the method's name. Each model also names the backends that run it ("module:Class", imported
only when used): quantloop.backends.base.REGISTRY is built from them.

QuantSpec is the union, for annotations; quant_spec(**fields) and parse_spec(data) build one. A spec written
when every method shared one flat model (a quantization_config.json, a LangGraph checkpoint) still loads: a field
of another method that holds its old default is dropped; any other value is refused with one line. A method
outside the built-in ones: a SpecBase subclass with its own `method` Literal, registered with register_spec
(quantloop.backends.base.register does it for a backend's `settings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, Union, get_args

from pydantic import Field, TypeAdapter, ValidationError, WrapSerializer, WrapValidator, model_validator

from quantloop.errors import InputError
from quantloop.schemas.base import Strict


@dataclass(frozen=True)
class Needs:
    """What a quantizer needs before it can start."""

    hf_checkpoint: bool = False  # a transformers checkpoint folder (config.json + weights)
    f16_gguf: bool = False  # the prepared F16/F32 GGUF (quantloop prepare writes it)
    calibration: str | None = None  # None, "sequences" (token ids) or "text_file" (a file llama-imatrix tokenizes)


class CalibrationSpec(Strict):
    """Where calibration text comes from and how much of it."""

    source: Literal["dataset", "synthetic"] = "dataset"
    dataset_dir: str | None = Field(None, description="prepared dataset folder (default: SLM/datasets/shakespeare)")
    mix: list[str] = Field(default_factory=list, description="more prepared datasets (folders, or names under SLM/datasets) "
                           "whose calibration split is mixed in: the samples are shared equally, in turn, among "
                           "dataset_dir and these (a Hessian fitted to one domain overfits it)")
    split: str = "calibration"
    samples: int = Field(128, ge=1)
    seqlen: int = Field(512, ge=16)
    seed: int = 0


# The fields the single flat spec gave every method, with their defaults: every spec written then holds them all.
LEGACY_DEFAULTS: dict[str, object] = {
    "act_order": False, "imatrix": False, "preset": None, "layer_types": {}, "gguf_tensor_types": {},
    "skip_modules": ["lm_head"], "overrides": {}, "min_size_ratio": None, "qat_steps": 200, "qat_init": "teacher",
    "qat_max_minutes": None,
}


class FieldRefused(ValueError):
    """A field the spec's method does not apply, holding a value other than its old default."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem} ({fix})")


class SpecBase(Strict):
    """The fields every method has, and the method-dependent answers each method's model overrides."""

    label: ClassVar[str] = ""  # the method's name in messages
    backends: ClassVar[tuple[str, ...]] = ()  # "module:Class" of the backends that run it, tried in order
    quantized_by_llama_cpp: ClassVar[bool] = False  # llama.cpp's own quantizers: a GGUF llama.cpp loads is all it needs
    gguf_only: ClassVar[bool] = False  # every output is a GGUF file (groups are GGUF blocks of 32)
    exact_export: ClassVar[bool] = False  # with a gguf_type, the GGUF's layout is fixed by the type alone
    type_sets_bits: ClassVar[bool] = False  # with a gguf_type, the type fixes the bit width (bits is not read)
    trains: ClassVar[bool] = False  # trains the model (policy steps of kind qat)

    method: str
    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(128, description="weights per quantization group along the input dimension; -1 = per channel")
    symmetric: bool = True
    gguf_type: str | None = Field(None, description="llama.cpp type for method 'gguf' (Q4_K_M, Q8_0, ...) or the export target")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _other_methods_fields(cls, data):
        """An earlier flat spec: another method's field at its old default is dropped, any other value refused."""
        if not isinstance(data, dict):
            return data
        foreign = [k for k in data if k not in cls.model_fields and k in LEGACY_DEFAULTS]
        if not foreign:
            return data
        data = dict(data)
        for name in foreign:
            value = data.pop(name)
            if value != LEGACY_DEFAULTS[name]:
                raise FieldRefused(*cls.refusal(name, value))
        return data

    @classmethod
    def refusal(cls, name: str, value) -> tuple[str, str]:
        """(problem, fix) for a field of another method given to this one."""
        method, label = method_of(cls), cls.label
        owners, mapped = spoken(methods_with(name)), spoken(methods_with("layer_types"))
        messages = {
            "overrides": (f"{label} does not apply per-module 'overrides'",
                          f"drop them, or give a precision map (layer_types, --layer-type / --tensor-type) to method {mapped}"),
            "gguf_tensor_types": (f"{label} does not apply per-tensor GGUF types (gguf_tensor_types / --tensor-type)",
                                  f"drop them, or use method {owners}, which write GGUF files"),
            "skip_modules": (f"{label} does not apply 'skip_modules' {value}",
                             "drop the field, or keep a layer type in float with a precision map (e.g. --layer-type attention=F16)"),
            "min_size_ratio": (f"min_size_ratio applies to methods {spoken(methods_with(name), 'and')} writing a GGUF type, "
                               f"not {method}", f"give --method {'/'.join(methods_with(name))} with --type, or drop the budget"),
            "act_order": (f"act-order is a GPTQ option; {label} has none", f"leave act_order off for {label}"),
        }
        return messages.get(name, (f"'{name}' is a setting of method {owners}, not of {method}",
                                   f"drop it, or use method {owners}"))

    def needs(self) -> Needs:
        """What the method's backends need (a backend may say otherwise: Backend.needs)."""
        return Needs(hf_checkpoint=True)

    def uses_calibration(self) -> bool:
        return self.needs().calibration is not None

    def has_layer_map(self) -> bool:
        """A preset or layer types: the types of whole layer types, not one type for every linear."""
        return False

    def has_precision_map(self) -> bool:
        """A mixed-precision map (preset, layer types or tensor types) rather than one type for every linear."""
        return False

    def size_budget(self) -> float | None:
        """The whole file at least this many times smaller than the F16 GGUF (min_size_ratio), or None."""
        return None

    def time_limit(self) -> float | None:
        """Minutes the training may take (qat_max_minutes), or None."""
        return None

    def with_time_limit(self, minutes: float):
        """The spec with its training limited to `minutes`; a method that does not train ignores it."""
        return self

    def _synth(self) -> str:
        return "-synth" if self.uses_calibration() and self.calibration.source == "synthetic" else ""

    def tag(self) -> str:
        """A short name of the attempt, used in folder names."""
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.method}-w{self.bits}{g}{'' if self.symmetric else '-asym'}{self._synth()}"


class MappedSpec(SpecBase):
    """A method that writes a GGUF from a mixed-precision map."""

    gguf_tensor_types: dict[str, str] = Field(default_factory=dict, description="GGUF type per tensor-name pattern (llama-quantize "
                                              "--tensor-type; first match wins, before layer types), e.g. {'attn_v': 'q8_0'}")
    preset: str | None = Field(None, description="mixed-precision preset (quantloop.gguf.precision_map.PRESETS), e.g. arch-default")
    layer_types: dict[str, str] = Field(default_factory=dict, description="GGUF type per layer type, e.g. {'attention': 'Q4_K'}")

    def has_layer_map(self) -> bool:
        return bool(self.preset or self.layer_types)

    def has_precision_map(self) -> bool:
        return bool(self.preset or self.layer_types or self.gguf_tensor_types)

    def _map_tag(self) -> str:
        """The precision map in a tag: the preset, 'mix' for layer types alone, '<preset>-mix' for both."""
        return f"{self.preset or 'mix'}{'-mix' if self.preset and (self.layer_types or self.gguf_tensor_types) else ''}"


class BudgetedSpec(MappedSpec):
    """A method that can fit the whole file to a size budget (the least sensitive tensors go below their types)."""

    min_size_ratio: float | None = Field(None, gt=1.0, description="with a gguf_type: the whole file at least this many times "
                                         "smaller than the F16 GGUF; the least sensitive tensors (measured KLD per byte) go "
                                         "below the planned types (Q3_K, Q2_K) until it fits")

    def size_budget(self) -> float | None:
        return self.min_size_ratio

    def _budget_tag(self) -> str:
        return f"-x{self.min_size_ratio:g}" if self.min_size_ratio else ""


class GGUFSpec(MappedSpec):
    """llama.cpp's own quantizers on the prepared F16 GGUF."""

    label: ClassVar[str] = "llama.cpp quantization"
    backends: ClassVar[tuple[str, ...]] = ("quantloop.backends.gguf:LlamaCppBackend",)
    quantized_by_llama_cpp: ClassVar[bool] = True
    gguf_only: ClassVar[bool] = True
    type_sets_bits: ClassVar[bool] = True

    method: Literal["gguf"] = "gguf"
    imatrix: bool = Field(False, description="importance matrix from the calibration text (llama-imatrix)")

    def needs(self) -> Needs:
        return Needs(f16_gguf=True, calibration="text_file" if self.imatrix else None)

    def has_precision_map(self) -> bool:  # --tensor-type alone keeps llama.cpp's own mix around it
        return self.has_layer_map()

    def tag(self) -> str:
        imat = "-imat" if self.imatrix else ""
        mix = (f"-{self.preset}" if self.preset else "") + ("-mix" if self.gguf_tensor_types or self.layer_types else "")
        if self.has_layer_map():
            return f"gguf{mix}{imat}{self._synth()}"
        return f"gguf-{(self.gguf_type or 'q4_k_m').lower()}{imat}{mix}{self._synth()}"


class RTNSpec(SpecBase):
    """Round-to-nearest per group: the calibration-free baseline."""

    label: ClassVar[str] = "RTN"
    backends: ClassVar[tuple[str, ...]] = ("quantloop.backends.rtn:RTNBackend",)
    exact_export: ClassVar[bool] = True

    method: Literal["rtn"] = "rtn"


# GGUF types GPTQModel's layouts cannot hold: GPTQ runs on llama.cpp's grid for them
GRID_ONLY_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")


class GPTQSpec(BudgetedSpec):
    """GPTQ: GPTQModel's layouts, or quantloop's solver on llama.cpp's grids."""

    label: ClassVar[str] = "GPTQ"
    backends: ClassVar[tuple[str, ...]] = ("quantloop.backends.gptq.grid:GridGPTQBackend",
                                           "quantloop.backends.gptq.gptqmodel:GPTQModelBackend")
    exact_export: ClassVar[bool] = True

    method: Literal["gptq"] = "gptq"
    act_order: bool = False

    def gptq_on_gguf_grid(self) -> bool:
        """GPTQ by quantloop's own solver on llama.cpp's grids (backends/gptq/grid.py) rather than GPTQModel's
        layouts: for a k-quant type or IQ4_NL, a precision map, or act-order into a GGUF type."""
        return bool(self.has_precision_map() or (self.gguf_type and self.act_order)
                    or (self.gguf_type or "").upper() in GRID_ONLY_TYPES)

    def needs(self) -> Needs:
        return Needs(hf_checkpoint=True, f16_gguf=self.gptq_on_gguf_grid(), calibration="sequences")

    def tag(self) -> str:
        if not self.gptq_on_gguf_grid():
            return super().tag()
        target = self._map_tag() if self.has_precision_map() else self.gguf_type.lower()
        return f"gptq-{target}{'-act' if self.act_order else ''}{self._budget_tag()}{self._synth()}"


class AWQSpec(SpecBase):
    """AWQ by GPTQModel."""

    label: ClassVar[str] = "AWQ"
    backends: ClassVar[tuple[str, ...]] = ("quantloop.backends.gptq.gptqmodel:GPTQModelBackend",)
    exact_export: ClassVar[bool] = True

    method: Literal["awq"] = "awq"

    def needs(self) -> Needs:
        return Needs(hf_checkpoint=True, calibration="sequences")


class AutoRoundSpec(SpecBase):
    """AutoRound (Intel) into a GGUF type."""

    label: ClassVar[str] = "AutoRound"
    backends: ClassVar[tuple[str, ...]] = ("quantloop.backends.autoround:AutoRoundBackend",)
    gguf_only: ClassVar[bool] = True
    type_sets_bits: ClassVar[bool] = True

    method: Literal["autoround"] = "autoround"
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"], description="modules left unquantized")

    def needs(self) -> Needs:
        return Needs(hf_checkpoint=True, calibration="sequences")


class QATSpec(BudgetedSpec):
    """Quantization-aware training by KL distillation onto a GGUF type's grid (or a precision map's grids)."""

    label: ClassVar[str] = "QAT"
    backends: ClassVar[tuple[str, ...]] = ("quantloop.backends.qat.backend:QATBackend",)
    gguf_only: ClassVar[bool] = True
    exact_export: ClassVar[bool] = True
    type_sets_bits: ClassVar[bool] = True
    trains: ClassVar[bool] = True

    method: Literal["qat"] = "qat"
    qat_steps: int = Field(200, ge=0, description="optimizer steps of the KL distillation")
    qat_init: Literal["teacher", "gptq"] = Field("teacher", description="start from the float weights rounded to the grid "
                                                 "(teacher) or from act-order GPTQ on the same grid, whose block scales the "
                                                 "training then learns (gptq)")
    qat_max_minutes: float | None = Field(None, gt=0, description="time limit of the step up to its export (sensitivity, GPTQ "
                                          "start, training; steps shrink to fit); in a policy run a cap on the run's own limit "
                                          "(max_minutes less what must fit after it), which alone decides when unset")

    def needs(self) -> Needs:
        return Needs(hf_checkpoint=True, f16_gguf=self.has_precision_map(), calibration="sequences")

    def time_limit(self) -> float | None:
        return self.qat_max_minutes

    def with_time_limit(self, minutes: float) -> QATSpec:
        return self.model_copy(update={"qat_max_minutes": minutes})

    def tag(self) -> str:
        target = self.gguf_type.lower() if self.gguf_type else f"w{self.bits}{'' if self.symmetric else '-asym'}"
        if self.has_precision_map():
            target = self._map_tag()
        start = "-from-gptq" if self.qat_init == "gptq" else ""
        limit = f"-m{self.qat_max_minutes:g}" if self.qat_max_minutes else ""
        return f"qat-{target}-s{self.qat_steps}{limit}{start}{self._budget_tag()}{self._synth()}"


# --------------------------------------------------------------------------- the union

SPEC_MODELS: tuple[type[SpecBase], ...] = (GGUFSpec, RTNSpec, GPTQSpec, AWQSpec, AutoRoundSpec, QATSpec)


def method_of(cls: type[SpecBase]) -> str:
    return get_args(cls.model_fields["method"].annotation)[0]


METHODS: tuple[str, ...] = tuple(method_of(c) for c in SPEC_MODELS)  # the one list of quantization methods
QuantMethod = Literal[METHODS]
_REGISTERED: dict[str, type[SpecBase]] = {}  # methods added after the union was built (register_spec)


def register_spec(cls: type[SpecBase]) -> type[SpecBase]:
    """Accept `cls`'s method wherever a QuantSpec is (a method beside the built-in ones). Returns it."""
    if cls not in SPEC_MODELS:
        _REGISTERED[method_of(cls)] = cls
    return cls


def unregister_spec(cls: type[SpecBase]) -> None:
    if _REGISTERED.get(method_of(cls)) is cls:
        del _REGISTERED[method_of(cls)]


def spec_type(method: str) -> type[SpecBase]:
    """The settings model of a method."""
    found = {method_of(c): c for c in SPEC_MODELS} | _REGISTERED
    if method not in found:
        raise InputError(None, f"method '{method}' is not available", f"use one of {', '.join(sorted(found))}")
    return found[method]


def methods_with(field: str) -> list[str]:
    """The built-in methods whose settings have `field`."""
    return [method_of(c) for c in SPEC_MODELS if field in c.model_fields]


def spoken(names: list[str], last: str = "or") -> str:
    return f"{', '.join(names[:-1])} {last} {names[-1]}" if len(names) > 1 else "".join(names) or "none"


def _registered_methods(data, handler):
    """A registered method's own model; a built-in one through the union, its errors located as a single model's."""
    method = data.get("method") if isinstance(data, dict) else getattr(data, "method", None)
    cls = _REGISTERED.get(method) if isinstance(method, str) else None
    if cls is not None:
        return data if isinstance(data, cls) else cls.model_validate(data)
    try:
        return handler(data)
    except ValidationError as e:
        raise ValidationError.from_exception_data(e.title, [_as_one_model(err, method) for err in e.errors()]) from None


def _as_one_model(err: dict, method) -> dict:
    """A union error as one model's: no method name at the head of its location, a bad or missing method as the
    'method' field's error."""
    loc, out = tuple(err["loc"]), {"type": err["type"], "input": err["input"]}
    if err["type"] == "union_tag_invalid":
        expected = [repr(m) for m in (*METHODS, *_REGISTERED)]
        return {"type": "literal_error", "loc": loc + ("method",), "input": method,
                "ctx": {"expected": f"{', '.join(expected[:-1])} or {expected[-1]}"}}
    if err["type"] == "union_tag_not_found":
        return {"type": "missing", "loc": loc + ("method",), "input": err["input"]}
    if loc and loc[0] == method:
        loc = loc[1:]
    return out | {"loc": loc} | ({"ctx": err["ctx"]} if "ctx" in err else {})


def _serialize_registered(spec, handler, info):
    return spec.model_dump(mode=info.mode) if type(spec) in _REGISTERED.values() else handler(spec)


QuantSpec = Annotated[Union[SPEC_MODELS], Field(discriminator="method"), WrapValidator(_registered_methods),
                      WrapSerializer(_serialize_registered)]
_ADAPTER: TypeAdapter = TypeAdapter(QuantSpec)


def parse_spec(data) -> SpecBase:
    """The spec of a mapping (a YAML step, a quantization_config.json's "spec", keyword fields). A field of another
    method that is not at its old default is one InputError; any other bad field a pydantic ValidationError."""
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        refused = next((err["ctx"]["error"] for err in e.errors()
                        if isinstance(err.get("ctx", {}).get("error"), FieldRefused)), None)
        if refused is not None:
            raise InputError(None, refused.problem, refused.fix) from None
        raise


def quant_spec(**fields) -> SpecBase:
    """quant_spec(method="gguf", gguf_type="Q8_0"): the method's settings model with these fields."""
    return parse_spec(fields)
