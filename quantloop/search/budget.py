"""A file-size budget for one quantization attempt: when the planned types make a file larger than the budget,
the tensors that go down to a smaller type are chosen by their measured sensitivity.

The budget is a size ratio against the model's F16 GGUF (3.5 means the whole file, embedding, norms and
tokenizer included, at most 1/3.5 of the F16 file's bytes). Each unit (a layer x module group, as the
sensitivity table has them) starts at its planned type; while the exact file size (quantloop's estimate) is
over the budget, the one downgrade with the least measured KL divergence added per byte saved is taken, a
mirror of ExLlamaV3's upgrade rule. Smaller types are those the unit's rows can hold (Q3_K and Q2_K need rows
of 256: SmolLM2's 1536-wide ffn_down). The result is the attempt's spec with one type per tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from quantloop.data.calibration import calibration_dirs, shares
from quantloop.errors import InputError
from quantloop.gguf.export import planned_export_types
from quantloop.gguf.precision_map import estimate_bytes, plan_precision_map
from quantloop.knowledge.identity import model_fact
from quantloop.knowledge.store import KnowledgeStore
from quantloop.search.attention import prior_guided_rows, record_rows
from quantloop.search.schemas import SensitivityRequest, SensitivityRow, TextSpec
from quantloop.search.sensitivity import SensitivitySession, units_of
from quantloop.search.tensors import model_tensors, tensor_bytes

LOWER_TYPES = ("Q3_K", "Q2_K")  # below 4 bits: the types a budget may spend on the least sensitive tensors


@dataclass(frozen=True)
class Downgrade:
    """One unit (a sensitivity unit, or one tensor when the plan is forced) taken below its planned type."""

    unit: str
    from_type: str
    to_type: str
    bytes_saved: int | None = None  # measured downgrades: the bytes it saves and the KL divergence it adds
    kld_added: float | None = None
    forced: bool = False  # the only plan that fits: nothing measured
    prior: bool = False  # decided on a prior from related models (the knowledge store), not on this model's measurement


@dataclass(frozen=True)
class BudgetRecord:
    """What a size budget decided for one attempt."""

    budget_bytes: int  # the F16 GGUF's bytes / min_size_ratio
    f16_bytes: int
    planned_bytes: int  # the file the planned types write
    downgrades: list[Downgrade] = field(default_factory=list)
    bytes: int | None = None  # the file the fitted types write; None while a choice is left to measure
    forced: bool = False  # only one plan fits (every tensor that can go lower at its smallest type)
    sensitivity_cache: str | None = None  # the measured sensitivity's cache file, when one was measured
    units: int = 0  # sensitivity units the budget could move
    measured_units: list[str] = field(default_factory=list)  # units measured on this model (now or from the cache)
    prior_units: list[str] = field(default_factory=list)  # units never measured on this model: priors from related models
    prior_sources: list[str] = field(default_factory=list)  # the related models the priors come from
    prior_ratio: float | None = None  # this model's values over the priors', learned from the units measured
    prior_spread: float | None = None  # the relative sigma left on the priors after that


def planned_types(gguf: Path, spec) -> dict[str, str]:
    """The type every tensor of the attempt's file gets, before any budget."""
    if spec.has_precision_map():
        return plan_precision_map(gguf, spec)[2]
    return planned_export_types(gguf, spec.gguf_type.upper())


def file_bytes(gguf: Path, types: dict[str, str]) -> int:
    return estimate_bytes(gguf, types)["bytes"]


def downgrades(types: dict[str, str], rows: list[SensitivityRow], budget: int, size: int) -> tuple[dict[str, str], list[Downgrade]]:
    """Take the cheapest downgrade (KLD added per byte saved) until `size` fits the budget; (types, steps taken)."""
    by_unit: dict[str, dict[str, SensitivityRow]] = {}
    for r in rows:
        by_unit.setdefault(r.unit, {})[r.type] = r
    current = {u: types[opts[next(iter(opts))].tensors[0]] for u, opts in by_unit.items()}
    taken = []
    while size > budget:
        best = None
        for unit, opts in by_unit.items():
            here = opts.get(current[unit])
            if here is None:
                continue
            for t, r in opts.items():
                saved = here.bytes - r.bytes
                if saved > 0:
                    cost = (r.kld - here.kld) / saved
                    if best is None or cost < best[0]:
                        best = (cost, unit, t, saved)
        if best is None:
            return types, taken
        _, unit, t, saved = best
        for name in by_unit[unit][t].tensors:
            types[name] = t
        taken.append(Downgrade(unit, current[unit], t, bytes_saved=saved,
                               kld_added=by_unit[unit][t].kld - by_unit[unit][current[unit]].kld,
                               prior=by_unit[unit][t].source == "prior" or by_unit[unit][current[unit]].source == "prior"))
        current[unit] = t
        size -= saved
    return types, taken


def next_costs(types: dict[str, str], rows: list[SensitivityRow]) -> list[float]:
    """KLD added per byte saved by each unit's next downgrade from the type `types` gives it (what the budget left)."""
    by_unit: dict[str, dict[str, SensitivityRow]] = {}
    for r in rows:
        by_unit.setdefault(r.unit, {})[r.type] = r
    out = []
    for opts in by_unit.values():
        here = opts.get(types[next(iter(opts.values())).tensors[0]])
        if here is not None:
            out += [(r.kld - here.kld) / (here.bytes - r.bytes) for r in opts.values() if r.bytes < here.bytes]
    return out


def plan_without_measuring(gguf: Path, spec) -> tuple[dict[str, str] | None, BudgetRecord]:
    """(types, record) when no measurement can change the budget's plan: the planned file already fits, or only
    one plan fits (every tensor that can go lower must go to its smallest type, and raising any one of them breaks
    the budget); (None, record) when there is a choice to measure. One error line, before any measurement, when
    even that smallest file is over the budget."""
    types, record, decided = budget_plan(gguf, spec)
    return (types if decided else None), record


def budget_plan(gguf: Path, spec) -> tuple[dict[str, str], BudgetRecord, bool]:
    """(types, record, decided): plan_without_measuring's answer, with the planned types when not decided."""
    f16_bytes = gguf.stat().st_size
    budget = int(f16_bytes / spec.min_size_ratio)
    types = planned_types(gguf, spec)
    size = file_bytes(gguf, types)
    record = BudgetRecord(budget_bytes=budget, f16_bytes=f16_bytes, planned_bytes=size)
    if size <= budget:
        return types, replace(record, bytes=size), True
    mt = model_tensors(gguf, tuple(sorted({t for t in types.values() if t not in ("F32", "F16")} | set(LOWER_TYPES))))
    # each tensor that can go lower: its planned type, then the lower types its rows hold, largest first
    ladders = {t.name: [types[t.name]] + [x for x in LOWER_TYPES if x in t.types] for t in mt.tensors
               if any(x in LOWER_TYPES for x in t.types)}
    floor = dict(types) | {n: steps[-1] for n, steps in ladders.items()}
    floor_size = file_bytes(gguf, floor)
    if floor_size > budget:
        raise InputError(None, f"the smallest file these types allow is {floor_size:,} bytes, over the budget of {budget:,} "
                         f"(F16 {f16_bytes:,} / {spec.min_size_ratio})", "lower min_size_ratio or allow smaller types")
    info = mt.by_name()
    slack = budget - floor_size
    if all(tensor_bytes(info[n].n_weights, steps[-2], mt.alignment) - tensor_bytes(info[n].n_weights, steps[-1], mt.alignment)
           > slack for n, steps in ladders.items()):
        taken = [Downgrade(n, types[n], steps[-1], forced=True) for n, steps in ladders.items()]
        return floor, replace(record, bytes=floor_size, downgrades=taken, forced=True), True
    return types, record, False


def fit_to_budget(model, spec, progress=None, memory: KnowledgeStore | None = None):
    """(spec, BudgetRecord): the attempt's spec with one type per tensor so that its file is at least spec.min_size_ratio
    times smaller than the F16 GGUF, and what was decided. Unchanged when the planned file already fits. With a
    knowledge store, related checkpoints' sensitivities are priors and only the units that can change the allocation
    are measured (search/attention.py); what is measured is recorded in the store."""
    gguf = model.gguf
    types, record, decided = budget_plan(gguf, spec)
    if decided:
        return (spec if not record.downgrades else with_types(spec, types)), record
    budget, f16_bytes, size = record.budget_bytes, record.f16_bytes, record.planned_bytes
    if spec.calibration.source == "synthetic":  # data-free: no dataset is read, for the budget either
        text = [TextSpec(source="synthetic", chunks=4, seqlen=256)]
    else:
        dirs = calibration_dirs(spec.calibration)  # the calibration text's domains, 4 chunks shared among them
        text = [TextSpec(dataset_dir=str(d), split="calibration", chunks=n, seqlen=256)
                for d, n in zip(dirs, shares(max(4, len(dirs)), len(dirs)))]
    measured_types = sorted({t for t in types.values() if t not in ("F32", "F16")} | set(LOWER_TYPES))
    # only units that can go lower are measured (at their planned type and below): the others cannot move
    units = [u for u, ts in units_of(model_tensors(gguf, tuple(measured_types)), "group").items()
             if any(t in LOWER_TYPES for t in ts[0].types)]
    planned = {u: types[ts[0].name] for u, ts in units_of(model_tensors(gguf, tuple(measured_types)), "group").items() if u in units}
    with tqdm(desc="sensitivity for the size budget", unit="unit", leave=False) as bar:
        def tick(i, n, unit, typ, kld):
            bar.total = n
            bar.update(i - bar.n)
            if progress is not None:
                progress(i, n, unit, typ, kld)

        session = SensitivitySession(SensitivityRequest(model=str(model.path), text=text, types=measured_types, granularity="group",
                                                        units=units), progress=tick)
        keep = lambda r: r.type in LOWER_TYPES or all(types[n] == r.type for n in r.tensors)  # noqa: E731
        log = None
        if memory is not None and memory.enabled:  # priors from related checkpoints: measure where the allocation is decided
            def allocate(rows):
                rows = [r for r in rows if keep(r)]
                fitted, taken = downgrades(dict(types), rows, budget, size)
                return taken, next_costs(fitted, rows)

            all_rows, log = prior_guided_rows(session, memory, planned, allocate)
        else:
            all_rows = [session.row(u, t) for u, t in session.todo]
    rows = [r for r in all_rows if keep(r)]
    if memory is not None and memory.enabled:
        record_rows(memory, model_fact(model), session.text_id, all_rows)
        memory.save()
    types, taken = downgrades(dict(types), rows, budget, size)
    size = file_bytes(gguf, types)
    if size > budget:
        raise InputError(None, f"the smallest file these types allow is {size:,} bytes, over the budget of {budget:,} "
                         f"(F16 {f16_bytes:,} / {spec.min_size_ratio})", "lower min_size_ratio or allow smaller types")
    priors = log.priors if log else []
    return with_types(spec, types), replace(record, bytes=size, downgrades=taken, sensitivity_cache=str(session.cache_file),
                                            units=len(units), measured_units=[u for u in units if u not in priors],
                                            prior_units=priors, prior_sources=log.sources if log else [],
                                            prior_ratio=log.ratio if log else None, prior_spread=log.spread if log else None)


def with_types(spec, types: dict[str, str]):
    """The attempt's spec naming one type per tensor (the budget already met)."""
    rules = {f"^{re.escape(n)}$": t for n, t in types.items() if t not in ("F32",)}
    return spec.model_copy(update={"gguf_tensor_types": rules, "min_size_ratio": None, "layer_types": {"norms": "F32"}, "preset": None})
