"""Baselines from the sensitivity table: which type each unit gets under a file-size budget.

- greedy: ExLlamaV3's rule: start every unit at its smallest type, then keep buying the upgrade with the best
  KLD saved per byte that still fits the budget;
- ilp: the exact optimum of the same additive model (minimise the sum of the units' KLDs subject to the
  bytes), an integer program solved by CBC through PuLP.

Both predict the KLD as the sum of the units' measured sensitivities; the search then measures them.
F16 is treated as lossless (KLD 0).
"""

from __future__ import annotations

from quantloop.errors import InputError
from quantloop.gguf.llamacpp import read_metadata
from quantloop.search.schemas import Allocation, SensitivityRow
from quantloop.search.tensors import FLOAT16, ModelTensors, genome_bits_per_weight, genome_bytes, tensor_bytes


def unit_options(mt: ModelTensors, rows: list[SensitivityRow]) -> dict[str, dict[str, tuple[int, float]]]:
    """unit -> type -> (bytes, measured KLD); F16 added at KLD 0."""
    by_name = mt.by_name()
    out: dict[str, dict[str, tuple[int, float]]] = {}
    members: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r.unit, {})[r.type] = (r.bytes, r.kld)
        members[r.unit] = r.tensors
    for unit, names in members.items():
        out[unit][FLOAT16] = (sum(tensor_bytes(by_name[n].n_weights, FLOAT16, mt.alignment) for n in names), 0.0)
    return out


def unit_members(rows: list[SensitivityRow]) -> dict[str, list[str]]:
    return {r.unit: r.tensors for r in rows}


def genome_of(choice: dict[str, str], members: dict[str, list[str]]) -> dict[str, str]:
    return {t: typ for unit, typ in choice.items() for t in members[unit]}


def min_bytes(mt: ModelTensors, options) -> int:
    return mt.fixed_bytes + sum(min(b for b, _ in o.values()) for o in options.values())


def check_budget(mt: ModelTensors, options, budget_bytes: int) -> None:
    smallest = min_bytes(mt, options)
    if budget_bytes < smallest:
        bpw = 8 * (smallest - mt.fixed_bytes) / mt.n_weights
        raise InputError(None, f"budget of {budget_bytes:,} bytes is below the smallest possible file ({smallest:,} bytes, "
                         f"about {bpw:.2f} bits per weight with these types)", "raise the budget or allow smaller types")


def _allocation(method, mt, choice, members, options, budget) -> Allocation:
    genome = genome_of(choice, members)
    return Allocation(method=method, budget_bytes=budget, genome=genome, bytes=genome_bytes(mt, genome),
                      bits_per_weight=genome_bits_per_weight(mt, genome),
                      predicted_kld=sum(options[u][t][1] for u, t in choice.items()))


def greedy(mt: ModelTensors, rows: list[SensitivityRow], budget_bytes: int) -> Allocation:
    options, members = unit_options(mt, rows), unit_members(rows)
    check_budget(mt, options, budget_bytes)
    choice = {u: min(o, key=lambda t: o[t][0]) for u, o in options.items()}
    used = mt.fixed_bytes + sum(options[u][t][0] for u, t in choice.items())
    while True:
        best = None
        for u, o in options.items():
            b0, k0 = o[choice[u]]
            for t, (b, k) in o.items():
                if b > b0 and k < k0 and used + b - b0 <= budget_bytes:
                    ratio = (k0 - k) / (b - b0)
                    if best is None or ratio > best[0]:
                        best = (ratio, u, t, b - b0)
        if best is None:
            break
        _, u, t, db = best
        choice[u] = t
        used += db
    return _allocation("greedy", mt, choice, members, options, budget_bytes)


def ilp(mt: ModelTensors, rows: list[SensitivityRow], budget_bytes: int, time_limit_s: int = 60) -> Allocation:
    import pulp  # deferred: pulp

    options, members = unit_options(mt, rows), unit_members(rows)
    check_budget(mt, options, budget_bytes)
    prob = pulp.LpProblem("precision_map", pulp.LpMinimize)
    x = {(u, t): prob.add_variable(f"x_{i}_{j}", cat="Binary") for i, (u, o) in enumerate(options.items()) for j, t in enumerate(o)}
    prob += pulp.lpSum(options[u][t][1] * v for (u, t), v in x.items())
    for u, o in options.items():
        prob += pulp.lpSum(x[u, t] for t in o) == 1
    prob += pulp.lpSum(options[u][t][0] * v for (u, t), v in x.items()) <= budget_bytes - mt.fixed_bytes
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s))  # CBC, shipped inside the pulp wheel
    if pulp.LpStatus[status] != "Optimal":
        raise RuntimeError(f"the integer program ended {pulp.LpStatus[status]}")
    choice = {u: next(t for t in o if x[u, t].value() > 0.5) for u, o in options.items()}
    return _allocation("ilp", mt, choice, members, options, budget_bytes)


def budget_bytes_for_bpw(mt: ModelTensors, bpw: float) -> int:
    """The file bytes at `bpw` bits per weight (quantloop's definition: tensor data over all weights) plus the header."""
    header = read_metadata(mt.gguf).data_offset
    return int(header + bpw * mt.n_weights / 8)


def unit_table(result, mt) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """unit -> (its tensors, the types it may take: the measured ones and F16)."""
    by_name = mt.by_name()
    measured = {(r.unit, r.type) for r in result.rows}
    return {r.unit: (r.tensors, tuple(t for t in by_name[r.tensors[0]].types if t == FLOAT16 or (r.unit, t) in measured))
            for r in result.rows}
