"""The kinds of atom the knowledge store holds, each a pydantic record and its MeTTa expression:

    (Model "digest" "name" "architecture" "family" n_params)
    (Tensor "digest" "unit" "role" layer n_weights (Shape rows width))
    (Measurement "digest" "unit" "role" layer "type" "text" (STV strength confidence) (KLD mean stderr n_tokens))
    (Attempt "digest" "run_id" "step" "tag" "method" "status" "verdict" passed "reason" "metrics-json" "acceptance-sha")
    (Front "digest" "study" trial kld_mean bytes bits_per_weight tg_tokens_per_s "genome-json")

A measurement's truth value (PLN's simple truth value) carries what a reader needs without the numbers: strength
kld / (1 + kld) (a monotone map of the KL divergence into [0, 1)), confidence n / (n + K) with n the evidence: the
tokens it was measured on, fewer when its standard error is large ((mean / stderr)^2 when that is smaller).
"""

from __future__ import annotations

import json
from typing import Literal

from hyperon.atoms import Atom, E, S, ValueAtom
from pydantic import BaseModel, ConfigDict, Field

from quantloop.knowledge.space import value

CONFIDENCE_K = 100.0  # evidence at which confidence is 0.5
KINDS = ("Model", "Tensor", "Measurement", "Attempt", "Front")


class Fact(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelFact(Fact):
    digest: str = Field(description="the weights' fingerprint: two checkpoints share it only when their weights are the same")
    name: str
    architecture: str
    family: str = Field(description="architecture and shapes: checkpoints of one family (fine-tunes, training steps, "
                                    "the off-grid twin) have the same tensors")
    n_params: int = 0


class TensorFact(Fact):
    digest: str
    unit: str = Field(description="a sensitivity unit: a tensor name or 'blk.N.<group>'")
    role: str = Field(description="what the unit does, the same in every model of a family: ffn_down, attn_qkv, token_embd, ...")
    layer: int
    n_weights: int
    shape: tuple[int, int] = (0, 0)


class MeasurementFact(Fact):
    digest: str
    unit: str
    role: str
    layer: int
    type: str = Field(description="the GGUF type the unit alone was quantized to")
    text: str = Field(description="digest of the text it was measured on")
    kld: float
    stderr: float | None = Field(None, description="standard error of the mean KLD over the scored positions")
    n_tokens: int = 0

    @property
    def strength(self) -> float:
        return self.kld / (1.0 + self.kld)

    @property
    def confidence(self) -> float:
        n = float(self.n_tokens)
        if self.stderr and self.kld > 0:
            n = min(n, (self.kld / self.stderr) ** 2)
        return n / (n + CONFIDENCE_K)


class AttemptFact(Fact):
    digest: str
    run_id: str
    step: str
    tag: str = Field(description="the spec's tag (method, type, group, calibration)")
    method: str
    status: str  # validated, skipped, failed
    verdict: str  # accepted, fallback, skipped, rejected
    passed: bool
    reason: str
    metrics: dict[str, float] = Field(default_factory=dict)
    acceptance: str = Field("", description="sha256 of the acceptance spec it was judged against")


class FrontFact(Fact):
    digest: str
    study: str
    trial: int
    kld_mean: float
    bytes: int
    bits_per_weight: float
    tg_tokens_per_s: float
    genome: dict[str, str]


Kind = Literal["Model", "Tensor", "Measurement", "Attempt", "Front"]
AnyFact = ModelFact | TensorFact | MeasurementFact | AttemptFact | FrontFact


def to_atom(f: AnyFact) -> Atom:
    v = ValueAtom
    if isinstance(f, ModelFact):
        return E(S("Model"), v(f.digest), v(f.name), v(f.architecture), v(f.family), v(int(f.n_params)))
    if isinstance(f, TensorFact):
        return E(S("Tensor"), v(f.digest), v(f.unit), v(f.role), v(int(f.layer)), v(int(f.n_weights)),
                 E(S("Shape"), v(int(f.shape[0])), v(int(f.shape[1]))))
    if isinstance(f, MeasurementFact):
        return E(S("Measurement"), v(f.digest), v(f.unit), v(f.role), v(int(f.layer)), v(f.type), v(f.text),
                 E(S("STV"), v(float(f.strength)), v(float(f.confidence))),
                 E(S("KLD"), v(float(f.kld)), v(float(f.stderr if f.stderr is not None else -1.0)), v(int(f.n_tokens))))
    if isinstance(f, AttemptFact):
        return E(S("Attempt"), v(f.digest), v(f.run_id), v(f.step), v(f.tag), v(f.method), v(f.status), v(f.verdict),
                 v(bool(f.passed)), v(f.reason), v(json.dumps(f.metrics, sort_keys=True)), v(f.acceptance))
    if isinstance(f, FrontFact):
        return E(S("Front"), v(f.digest), v(f.study), v(int(f.trial)), v(float(f.kld_mean)), v(int(f.bytes)),
                 v(float(f.bits_per_weight)), v(float(f.tg_tokens_per_s)), v(json.dumps(f.genome, sort_keys=True)))
    raise TypeError(f"not a knowledge fact: {type(f).__name__}")


def kind_of(atom: Atom) -> str | None:
    children = atom.get_children() if hasattr(atom, "get_children") else []
    return str(children[0]) if children and str(children[0]) in KINDS else None


def from_atom(atom: Atom) -> AnyFact:
    """The record an atom of one of the five kinds stands for (ValueError for any other atom)."""
    kind = kind_of(atom)
    c = atom.get_children() if kind else []
    x = [value(a) for a in c[1:]]
    if kind == "Model" and len(x) == 5:
        return ModelFact(digest=x[0], name=x[1], architecture=x[2], family=x[3], n_params=x[4])
    if kind == "Tensor" and len(x) == 6:
        shape = tuple(value(a) for a in c[6].get_children()[1:])
        return TensorFact(digest=x[0], unit=x[1], role=x[2], layer=x[3], n_weights=x[4], shape=shape)
    if kind == "Measurement" and len(x) == 8:
        kld, stderr, n = (value(a) for a in c[8].get_children()[1:])
        return MeasurementFact(digest=x[0], unit=x[1], role=x[2], layer=x[3], type=x[4], text=x[5], kld=kld,
                               stderr=None if stderr < 0 else stderr, n_tokens=n)
    if kind == "Attempt" and len(x) == 11:
        return AttemptFact(digest=x[0], run_id=x[1], step=x[2], tag=x[3], method=x[4], status=x[5], verdict=x[6],
                           passed=x[7], reason=x[8], metrics=json.loads(x[9]), acceptance=x[10])
    if kind == "Front" and len(x) == 8:
        return FrontFact(digest=x[0], study=x[1], trial=x[2], kld_mean=x[3], bytes=x[4], bits_per_weight=x[5],
                         tg_tokens_per_s=x[6], genome=json.loads(x[7]))
    raise ValueError(f"not a knowledge atom: {str(atom)[:120]}")
