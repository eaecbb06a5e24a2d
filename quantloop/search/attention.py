"""Attention on measurement (the ECAN idea, measured): when the knowledge store holds the sensitivity of related
checkpoints (same family, same unit and tensor role), their values are priors for this one; the units are measured
in order of importance x uncertainty, and measuring stops when no unit left unmeasured could change the size
budget's allocation within its noise.

For a unit and each type below its planned one, a downgrade costs c = (KLD added) / (bytes saved). The allocation
(budget.downgrades) takes the cheapest downgrades until the file fits; c* is the cost at its margin (between the
dearest step taken and the cheapest left). A unit's
  importance  = 1 / (1 + |ln(c / c*)|)   (1 at the margin, smaller the further its cost is from it),
  uncertainty = sigma_c / c              (the prior's relative error on that cost),
and it could change the allocation while |c - c*| <= Z sigma_c. Units measured, or held by the store for this very
model (same weights digest and text), have no uncertainty left. Rows left as priors say so (source 'prior').

The priors learn from what is measured: once MIN_PAIRS rows have both a prior and a measurement on this model, the
priors left are scaled by the median ratio measured / prior, and their sigma becomes the spread of the log ratios
(at least MIN_SPREAD), in place of the store's assumed 25 %: a checkpoint whose tensors are all a little more
sensitive than its relative's is recognised as such, and one that differs unit by unit keeps being measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from quantloop.knowledge.atoms import MeasurementFact, ModelFact, TensorFact
from quantloop.knowledge.identity import layer_of, model_fact, role_of
from quantloop.knowledge.store import KnowledgeStore, Prior
from quantloop.search.schemas import SensitivityRow
from quantloop.search.sensitivity import unit_group
from quantloop.search.tensors import tensor_bytes

Z = 2.0  # a decision is settled when the margin is more than Z standard deviations from a unit's cost
MIN_PAIRS = 6  # rows measured where a prior was known, before the priors left are recalibrated on them
MIN_SPREAD = 0.05  # the smallest relative sigma a recalibrated prior keeps


@dataclass
class UnitAttention:
    unit: str
    cost: float  # KLD added per byte saved by its downgrade nearest the margin
    sigma: float  # standard deviation of that cost (0 once measured)
    importance: float
    uncertainty: float

    @property
    def score(self) -> float:
        return self.importance * self.uncertainty


@dataclass
class AttentionLog:
    """What the prior-guided pass did: units measured (in order), units left as priors, the margin it stopped at."""

    measured: list[str] = field(default_factory=list)
    from_store: list[str] = field(default_factory=list)
    priors: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    margin: float | None = None
    allocation_changes: int = 0
    ratio: float | None = None  # this model's values over the priors' (median of the measured pairs), once learned
    spread: float | None = None  # the relative sigma left on the priors after that


def step_costs(opts: dict[str, SensitivityRow], sigmas: dict[str, float], planned: str) -> list[tuple[float, float]]:
    """(cost, sigma) of each downgrade of one unit from its planned type."""
    here = opts.get(planned)
    if here is None:
        return []
    out = []
    for t, r in opts.items():
        saved = here.bytes - r.bytes
        if saved > 0:
            out.append(((r.kld - here.kld) / saved, math.hypot(sigmas.get(t, 0.0), sigmas.get(planned, 0.0)) / saved))
    return out


def margin(taken_costs: list[float], next_costs: list[float]) -> float | None:
    """c*: between the dearest downgrade taken and the cheapest one left (geometric mean when both are positive)."""
    last = max(taken_costs) if taken_costs else None
    nxt = min(next_costs) if next_costs else None
    if last is None or nxt is None:
        return last if nxt is None else nxt
    return math.sqrt(last * nxt) if last > 0 and nxt > 0 else (last + nxt) / 2


def attention(unit: str, steps: list[tuple[float, float]], c_star: float) -> UnitAttention:
    """The unit's importance x uncertainty against the margin c*, from its downgrade nearest the margin (in sigmas)."""
    tiny = 1e-12
    cost, sigma = min(steps, key=lambda cs: abs(cs[0] - c_star) / max(cs[1], tiny))
    importance = 1.0 / (1.0 + abs(math.log(max(cost, tiny) / max(c_star, tiny))))
    return UnitAttention(unit, cost, sigma, importance, sigma / max(abs(cost), tiny))


def open_units(atts: list[UnitAttention], c_star: float) -> list[UnitAttention]:
    """The units whose decision could still flip within Z sigma of the margin, highest importance x uncertainty first."""
    return sorted((a for a in atts if a.sigma > 0 and abs(a.cost - c_star) <= Z * a.sigma), key=lambda a: -a.score)


def order_by_attention(units: dict[str, dict[str, SensitivityRow]], sigmas: dict[str, dict[str, float]],
                       planned: dict[str, str], c_star: float) -> list[UnitAttention]:
    """Every uncertain unit (one with a prior's sigma), highest importance x uncertainty first."""
    atts = []
    for u, opts in units.items():
        if any(s > 0 for s in sigmas.get(u, {}).values()):
            steps = step_costs(opts, sigmas[u], planned[u])
            if steps:
                atts.append(attention(u, steps, c_star))
    return sorted(atts, key=lambda a: -a.score)


def record_rows(memory: KnowledgeStore, model: ModelFact, text: str, rows: list[SensitivityRow]) -> int:
    """The model, its units and the rows measured on it into the store (never a prior). The count of new atoms."""
    new = int(memory.put(model))
    for r in rows:
        if r.source != "measured":
            continue
        role = role_of(r.unit)
        new += memory.put(TensorFact(digest=model.digest, unit=r.unit, role=role, layer=layer_of(r.unit), n_weights=r.n_weights))
        new += memory.put(MeasurementFact(digest=model.digest, unit=r.unit, role=role, layer=layer_of(r.unit), type=r.type,
                                          text=text, kld=r.kld, stderr=r.kld_stderr, n_tokens=r.n_tokens))
    return new


def as_prior(row: SensitivityRow, p: Prior) -> SensitivityRow:
    return row.model_copy(update={"kld": p.kld, "kld_stderr": p.sigma, "source": "prior", "prior_from": p.sources})


def calibration(pairs: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(ratio, relative sigma) of this model's values to its priors from (measured, prior) pairs; None when too few."""
    logs = [math.log(m / p) for m, p in pairs if m > 0 and p > 0]
    if len(logs) < MIN_PAIRS:
        return None
    logs.sort()
    mid = len(logs) // 2
    median = logs[mid] if len(logs) % 2 else (logs[mid - 1] + logs[mid]) / 2
    spread = math.sqrt(sum((x - median) ** 2 for x in logs) / (len(logs) - 1))
    return math.exp(median), max(spread, MIN_SPREAD) * math.sqrt(1 + 1 / len(logs))


def recalibrate(rows, sigmas, base: dict[tuple[str, str], Prior], log: "AttentionLog") -> None:
    """Scale the priors still unmeasured by what the measured ones taught (see the module's docstring)."""
    pairs = [(rows[u][t].kld, p.kld) for (u, t), p in base.items() if rows[u][t].source != "prior"]
    cal = calibration(pairs)
    if cal is None:
        return
    ratio, rel = cal
    log.ratio, log.spread = ratio, rel
    for (u, t), p in base.items():
        if rows[u][t].source == "prior":
            kld = p.kld * ratio
            rows[u][t] = rows[u][t].model_copy(update={"kld": kld, "kld_stderr": kld * rel})
            sigmas[u][t] = kld * rel


def prior_guided_rows(session, memory: KnowledgeStore, planned: dict[str, str], allocate) -> tuple[list[SensitivityRow], AttentionLog]:
    """The sensitivity rows the budget needs, measuring only where it matters. `session` is a SensitivitySession
    (rows on demand), `planned` the unit -> planned type, allocate(rows) -> (taken downgrades, costs of the next
    steps left). Without any prior the whole table is measured, as without memory."""
    model = model_fact(session.model)
    log = AttentionLog()
    priors = memory.priors(model, session.text_id)
    own = memory.measured(model, session.text_id)
    rows: dict[str, dict[str, SensitivityRow]] = {}
    sigmas: dict[str, dict[str, float]] = {}
    base: dict[tuple[str, str], Prior] = {}  # every row that started as a prior
    to_measure: list[str] = []
    for unit, typ in session.todo:
        role = role_of(unit)
        if session.is_cached(unit, typ):
            row = session.row(unit, typ)
        elif (unit, typ) in own:
            f = own[(unit, typ)]
            row = skeleton(session, unit, typ).model_copy(update={"kld": f.kld, "kld_stderr": f.stderr, "n_tokens": f.n_tokens,
                                                                  "source": "store"})
        elif (unit, typ) in priors and priors[(unit, typ)].role == role:
            p = priors[(unit, typ)]
            row = as_prior(skeleton(session, unit, typ), p)
            sigmas.setdefault(unit, {})[typ] = p.sigma
            base[(unit, typ)] = p
            log.sources = sorted(set(log.sources) | set(p.sources))
        else:
            row = None
            to_measure.append(unit)
        if row is not None:
            rows.setdefault(unit, {})[typ] = row
    for unit in dict.fromkeys(to_measure):  # no estimate at all: measured first
        measure_unit(session, unit, rows, sigmas, log)
    recalibrate(rows, sigmas, base, log)
    last_choice = None
    while True:
        flat = [r for opts in rows.values() for r in opts.values()]
        taken, next_costs = allocate(flat)
        choice = tuple(sorted((d.unit, d.to_type) for d in taken))
        if last_choice is not None and choice != last_choice:
            log.allocation_changes += 1
        last_choice = choice
        c_star = margin([d.kld_added / d.bytes_saved for d in taken if d.bytes_saved], next_costs)
        log.margin = c_star
        if c_star is None:
            break
        still_open = open_units(order_by_attention(rows, sigmas, planned, c_star), c_star)
        if not still_open:
            break
        measure_unit(session, still_open[0].unit, rows, sigmas, log)
        recalibrate(rows, sigmas, base, log)
    log.from_store = sorted({r.unit for opts in rows.values() for r in opts.values() if r.source == "store"})
    log.priors = sorted({r.unit for opts in rows.values() for r in opts.values() if r.source == "prior"})
    return [r for opts in rows.values() for r in opts.values()], log


def skeleton(session, unit: str, typ: str) -> SensitivityRow:
    """The unit's row at this type with everything but its KLD (bytes and tensors from the model's GGUF)."""
    ts = session.units[unit]
    return SensitivityRow(unit=unit, tensors=[t.name for t in ts], layer=ts[0].layer, group=unit_group(ts[0], session.req.granularity),
                          n_weights=sum(t.n_weights for t in ts), type=typ,
                          bytes=sum(tensor_bytes(t.n_weights, typ, session.mt.alignment) for t in ts), kld=0.0)


def measure_unit(session, unit: str, rows, sigmas, log: AttentionLog) -> None:
    for typ in [t for u, t in session.todo if u == unit]:
        rows.setdefault(unit, {})[typ] = session.row(unit, typ)
    sigmas.pop(unit, None)
    if unit not in log.measured:
        log.measured.append(unit)
