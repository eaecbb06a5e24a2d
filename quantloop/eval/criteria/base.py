"""The one shape of every acceptance criterion, and the registry the validation, the reviewer, the attempt line, the run
report, MLflow and the summary read them from.

A criterion is a class with a `name` (its results are called `name`, or `name:<part>` for the same bar on one part,
such as a held-out text domain) and these parts:

    needs                         the Measurements fields it reads (checked before it judges)
    check_inputs(spec)            raises InputError when its measurement's inputs are missing, before anything is measured
    measure(ctx) -> model | None  a measurement of its own, made by validate_quantization after the built-in ones and
                                  kept in the report under measurements.<name> (default: none; perplexity, speed,
                                  size and generation read the report's own fields, measured by eval/kld.py, ...)
    applies(acceptance)           whether the acceptance spec asks for it (default: always)
    judge(m, acceptance, sigmas)  its CriterionResults; a bar with a standard error counts as met only when cleared by
                                  `sigmas` (EvalSettings.decide_sigmas) standard errors (see shown)
    cells(metrics, where)         its cells in the attempt line ("line") and the run report's table ("report"), from
                                  the attempt's flattened metrics (the same numbers MLflow holds)
    section(rows)                 its own table in the run report, from every attempt's metrics (default: none)
    summary(metrics)              its fields in each attempt row of quantization_summary.json
    params(result)                MLflow parameters of the attempt run (its metrics come from the report: every
                                  number under criteria.<name> and measurements.<name>)
    bar(acceptance, where)        the bar in words, for the run's closing lines and the report
    describe_failure(result)      the reviewer's words for a failing result; `tip`: what a person should try

REGISTRY lists the built-in criteria as "module:Class", imported only when used; register(criterion) adds one (after
the built-in ones), unregister(criterion) removes it. A new criterion is one module and one line in REGISTRY.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel

from quantloop.schemas import AcceptanceCriteria, CriterionResult, GenerationReport, KLDReport, QualitySpec

if TYPE_CHECKING:
    from quantloop.models.checkpoints import ResolvedModel

Where = Literal["line", "report"]


@dataclass
class Measurements:
    """What validate_quantization measured, as the criteria read it."""

    kld: KLDReport
    held_out: dict[str, KLDReport] = field(default_factory=dict)
    speedup_tg: float | None = None
    speedup_tg_stderr: float | None = None
    speedup_tg_pairs: list[float] = field(default_factory=list)
    size_ratio: float | None = None
    bits: int | None = None
    generation: GenerationReport | None = None
    own: dict[str, BaseModel] = field(default_factory=dict)  # a criterion's own measurement (measure), by its name
    # the boundary (standard errors) a result's sequential measurement was decided with, by result name
    # (eval/sequential.py); a result without one is judged at decide_sigmas
    boundaries: dict[str, float] = field(default_factory=dict)

    def sigmas(self, result: str, default: float | None) -> float | None:
        return self.boundaries.get(result, default) if default is not None else None


@dataclass
class MeasureContext:
    """What a criterion's own measurement gets: both models, open on the runtime they are judged on, and the spec."""

    baseline: ResolvedModel
    quantized: ResolvedModel
    base_runner: object
    quant_runner: object
    runtime: str
    spec: QualitySpec
    dataset_dir: Path


@dataclass(frozen=True)
class Cell:
    header: str  # the column's header in the table
    text: str
    label: str = ""  # its word in the one-line attempt summary (default: the header)
    numeric: bool = True  # right-aligned in the HTML report

    @property
    def word(self) -> str:
        return self.label or self.header


@dataclass(frozen=True)
class Section:
    """A criterion's own table in the run report (one row per attempt, columns of its choosing)."""

    title: str
    note: str
    headers: list[str]
    rows: list[list[str]]


def how_close(margin: float | None) -> str:
    if margin is None or margin != margin or abs(margin) == float("inf"):
        return "margin unknown"
    return f"{'passes' if margin >= 0 else 'fails'} by {abs(margin):.1f} sigma"


def shown(margin: float | None, sigmas: float | None) -> tuple[bool, str]:
    """A bar counts as met only when the measurement clears it by `sigmas` standard errors, after measuring up to the
    spec's cap: within its own noise of the bar, a claim is not shown, and the verdict is the same on every draw
    (a ratio sitting on the bar fails every time instead of passing one run in two). (met, note)."""
    if margin is None or sigmas is None:
        return True, ""
    if margin >= sigmas:
        return True, ""
    if margin >= 0:
        return False, f"; not shown: within {sigmas:.3g} standard errors of the bar"
    return False, ""


def fmt(v, pattern: str) -> str:
    return "-" if v is None else pattern.format(v)


def number(metrics: Mapping[str, float], key: str) -> float | None:
    """A metric, or None when it is missing or not a number."""
    v = metrics.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


class Criterion:
    """Base class of every acceptance criterion (see the module docstring)."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    tip: ClassVar[str] = ""
    quality: ClassVar[bool] = False  # a quality bar: acceptance.quality says which of them must hold (see verdict)

    def check_inputs(self, spec: QualitySpec) -> None:
        """Raise InputError when what its measurement reads is missing (called before anything is measured)."""

    def measure(self, ctx: MeasureContext) -> BaseModel | None:
        return None

    @property
    def measures_own(self) -> bool:
        """Whether it has a measurement of its own (measure is overridden)."""
        return type(self).measure is not Criterion.measure

    def applies(self, acceptance: AcceptanceCriteria) -> bool:
        return True

    def judge(self, m: Measurements, acceptance: AcceptanceCriteria, sigmas: float | None) -> list[CriterionResult]:
        raise NotImplementedError

    def cells(self, metrics: Mapping[str, float], where: Where) -> list[Cell]:
        return []

    def section(self, rows: list[tuple[str, Mapping[str, float]]]) -> Section | None:
        """Its own table in the run report from every attempt's (label, metrics) (default: none)."""
        return None

    def summary(self, metrics: Mapping[str, float]) -> dict[str, float | None]:
        return {}

    def params(self, result: CriterionResult) -> dict[str, str]:
        return {}

    def bar(self, acceptance: AcceptanceCriteria, where: Where) -> str | None:
        return None

    def describe_failure(self, c: CriterionResult) -> str:
        return f"{c.name} {c.detail} (needs {c.threshold})"


class RatioCriterion(Criterion):
    """A criterion on one measured ratio against the float baseline (`metric`: its key in the attempt's metrics),
    shown as '1.23x' in a column named after the criterion."""

    metric: ClassVar[str]

    def cells(self, metrics: Mapping[str, float], where: Where) -> list[Cell]:
        value = metrics.get(self.metric) if where == "line" else number(metrics, self.metric)
        return [Cell(self.name, fmt(value, "{:.2f}x"))]

    def summary(self, metrics: Mapping[str, float]) -> dict[str, float | None]:
        return {self.metric: metrics.get(self.metric)}

    def describe_failure(self, c: CriterionResult) -> str:
        return f"{c.name} {c.measured:.2f}x (needs {c.threshold})"


class _Unknown(Criterion):
    """A result whose criterion is not registered (read back from an earlier run): described in general terms."""

    name = ""


# the built-in criteria, in the order of their results, columns and summary fields; imported only when used
REGISTRY: list[str] = [
    "quantloop.eval.criteria.perplexity:Perplexity",
    "quantloop.eval.criteria.speed:Speed",
    "quantloop.eval.criteria.size:Size",
    "quantloop.eval.criteria.generation:Generation",
    "quantloop.eval.criteria.accuracy:Accuracy",
]
_REGISTERED: list[Criterion] = []
_LOADED: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
    """Add a criterion after the built-in ones. Returns it."""
    if any(c.name == criterion.name for c in criteria()):
        raise ValueError(f"a criterion named '{criterion.name}' is registered already")
    _REGISTERED.append(criterion)
    return criterion


def unregister(criterion: Criterion) -> None:
    _REGISTERED.remove(criterion)


def _load(ref: str) -> Criterion:
    if ref not in _LOADED:
        module, cls = ref.split(":")
        _LOADED[ref] = getattr(importlib.import_module(module), cls)()
    return _LOADED[ref]


def criteria() -> list[Criterion]:
    """Every criterion: the built-in ones in REGISTRY's order, then the registered ones."""
    return [_load(ref) for ref in REGISTRY] + list(_REGISTERED)


def criterion_for(result_name: str) -> Criterion:
    """The criterion a result belongs to ('perplexity:bible' -> perplexity)."""
    family = result_name.split(":")[0]
    return next((c for c in criteria() if c.name == family), _Unknown())


# ---------------------------------------------------------------------- what the consumers call


def judge(m: Measurements, acceptance: AcceptanceCriteria, sigmas: float | None = None,
          names: set[str] | None = None) -> list[CriterionResult]:
    """Every criterion the acceptance spec asks for (of `names` when given), against its bar, in the registry's order."""
    known = {f.name for f in fields(Measurements)}
    out: list[CriterionResult] = []
    for c in criteria():
        if not c.applies(acceptance) or (names is not None and c.name not in names):
            continue
        missing = [n for n in c.needs if n not in known]
        if missing:
            raise ValueError(f"criterion '{c.name}' needs {', '.join(missing)}, which validation does not measure")
        out += c.judge(m, acceptance, sigmas)
    return out


def verdict(results: list[CriterionResult], acceptance: AcceptanceCriteria) -> tuple[bool, list[str]]:
    """(passed, the quality bars it rests on). Every binding result of a criterion that is not a quality bar must pass;
    of the quality bars (perplexity, accuracy), acceptance.quality says which must hold: one of them ('either', seed
    003's OR), each ('both'), or a named one. A quality bar holds when it has binding results and all of them pass."""
    binding = [r for r in results if r.binding]
    family = {r.name: criterion_for(r.name) for r in binding}
    others_pass = all(r.passed for r in binding if not family[r.name].quality)
    asked = [c.name for c in criteria() if c.quality and c.applies(acceptance)]
    held = [q for q in asked if any(family[r.name].name == q for r in binding)
            and all(r.passed for r in binding if family[r.name].name == q)]
    if acceptance.quality == "either":
        quality_pass, carried = bool(held), held
    else:
        carried = asked if acceptance.quality == "both" else [acceptance.quality]
        quality_pass = all(q in held for q in carried)
    passed = others_pass and quality_pass
    return passed, (carried if passed else [])


def can_still_pass(results: list[CriterionResult], pending: list[str], acceptance: AcceptanceCriteria) -> bool:
    """Whether the verdict can still be a pass when every criterion not judged yet (`pending`, by name) passes."""
    hope = [CriterionResult(name=n, passed=True, measured=None, threshold="", detail="") for n in pending]
    return verdict(results + hope, acceptance)[0]


def not_measured(skipped: Mapping[str, str], acceptance: AcceptanceCriteria) -> list[CriterionResult]:
    """Results for what was not measured ({result name: why}): reported, not binding."""
    return [CriterionResult(name=name, passed=False, measured=None, binding=False, detail=f"not measured: {why}",
                            threshold=criterion_for(name).bar(acceptance, "report") or "")
            for name, why in skipped.items()]


def in_registry_order(results: list[CriterionResult]) -> list[CriterionResult]:
    """Results grouped by criterion in the registry's order (a stable sort: each criterion's own order is kept)."""
    order = {c.name: i for i, c in enumerate(criteria())}
    return sorted(results, key=lambda r: order.get(r.name.split(":")[0], len(order)))


def row_cells(metrics: Mapping[str, float], where: Where) -> list[Cell]:
    """Every criterion's cells for one attempt (with empty metrics: the headers, each cell '-')."""
    return [cell for c in criteria() for cell in c.cells(metrics, where)]


def sections(rows: list[tuple[str, Mapping[str, float]]]) -> list[Section]:
    """The criteria's own tables in the run report."""
    return [sec for c in criteria() if (sec := c.section(rows)) is not None]


def summary_fields(metrics: Mapping[str, float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for c in criteria():
        out |= c.summary(metrics)
    return out


def result_params(results: list[CriterionResult]) -> dict[str, str]:
    """MLflow parameters the criteria add for an attempt's results."""
    out: dict[str, str] = {}
    for r in results:
        out |= criterion_for(r.name).params(r)
    return out


def bar_text(acceptance: AcceptanceCriteria, where: Where) -> str:
    return ", ".join(b for c in criteria() if (b := c.bar(acceptance, where)))


def tips(failed: set[str]) -> list[str]:
    """What to try, one tip per failing criterion (by name) that has one, in the registry's order."""
    return [c.tip for c in criteria() if c.name in failed and c.tip]
