"""Accuracy: the paired drop in benchmark accuracy of the quantized model against the float baseline, per task
('accuracy:<task>'), scored the way lm-evaluation-harness scores it on the runtime the model is judged on
(quantloop/benchmarks). The same items for both models; the drop's standard error comes from the per-item differences,
and a drop within decide_sigmas standard errors of the bar after the item cap has not shown that it meets the bar.

A task the float model does not beat chance on (by min_above_chance_pp and by two standard errors) says nothing about
degradation: its result is reported, not binding. The quality rule (acceptance.quality) says whether this bar, the
perplexity bar, either or both must hold (see base.verdict)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping

from pydantic import BaseModel, Field

from quantloop.benchmarks.score import TaskScore, evaluate_tasks, merged, paired_drop
from quantloop.benchmarks.tasks import TASKS, expand, task_configs
from quantloop.eval.criteria.base import Cell, Criterion, MeasureContext, Measurements, Section, Where, fmt, how_close, number, shown
from quantloop.eval.sequential import boundary_for, doubling
from quantloop.schemas import AcceptanceCriteria, AccuracySettings, CriterionResult, QualitySpec


class TaskAccuracy(BaseModel):
    metric: str = Field(description="acc or acc_norm: the one judged (the task's usual one in lm-evaluation-harness)")
    items: int
    chance: float = Field(description="accuracy of a uniform guess")
    base_acc: float
    base_acc_stderr: float
    quant_acc: float
    quant_acc_stderr: float
    drop_pp: float = Field(description="float minus quantized accuracy on the same items, percentage points (> 0: worse)")
    drop_stderr_pp: float = Field(description="standard error of the drop, from the per-item differences")
    changed: int = Field(description="items whose correctness differs between the two models")
    above_chance: bool = Field(description="the float model beats chance: the task can carry a verdict")
    seconds: float


class AccuracyMeasurement(BaseModel):
    tasks: dict[str, TaskAccuracy] = Field(description="the measured tasks, in the order they were measured")
    not_measured: dict[str, str] = Field(default_factory=dict, description="task -> why it was not measured")
    seconds: float
    decide_sigmas: float | None = Field(None, description="the boundary each task's drop is judged with: raised for the "
                                        "looks at items, 2x, 4x ... (eval/sequential.py); none: eval.decide_sigmas")


def above_chance(score: TaskScore, task: str, settings: AccuracySettings) -> bool:
    metric, chance = TASKS[task].metric, TASKS[task].chance
    return getattr(score, metric) - chance >= max(settings.min_above_chance_pp / 100, 2 * getattr(score, f"{metric}_stderr"))


def informative_first(base: dict[str, TaskScore]) -> list[str]:
    """Tasks by how many standard errors the float model sits above chance per second of scoring an item, most first:
    a task near chance cannot show a drop, and a slow one (HellaSwag's long endings) costs several fast ones, so a
    failing bar is found soonest. A task within two standard errors of chance comes last whatever its cost."""
    def z_per_s(task: str) -> float:
        s, metric = base[task], TASKS[task].metric
        se = getattr(s, f"{metric}_stderr") or 1e-9
        z = (getattr(s, metric) - TASKS[task].chance) / se
        per_item = s.seconds / max(s.items, 1) if s.seconds > 0 else 1.0
        return z / per_item if z >= 2 else z - 1e6  # within 2 standard errors of chance: it cannot carry a verdict
    return sorted(base, key=z_per_s, reverse=True)


def near_bar(drop_pp: float, se_pp: float, settings: AccuracySettings, sigmas: float) -> bool:
    return abs(settings.max_drop_pp - drop_pp) < sigmas * se_pp


def item_looks(settings: AccuracySettings) -> list[int]:
    return doubling(settings.items, max(settings.max_items or settings.items, settings.items))


def task_sigmas(ctx: MeasureContext) -> float:
    """The boundary of a task's drop: raised for its looks when validation is sequential, else decide_sigmas."""
    return boundary_for(item_looks(ctx.spec.acceptance.accuracy), ctx.spec.eval.decide_sigmas, ctx.spec.eval.sequential)


def measure_task(task: str, config: dict, ctx: MeasureContext, settings: AccuracySettings) -> TaskAccuracy:
    """Score `items` items on both models, then twice as many while the drop lies within its noise of the bar (the
    boundary task_sigmas), up to max_items (the float model's items come from the baseline cache after the first time)."""
    start, metric = time.perf_counter(), TASKS[task].metric
    n, cap = settings.items, max(settings.max_items or settings.items, settings.items)
    base = evaluate_tasks(ctx.base_runner, {task: config}, limit=n, model=ctx.baseline)[task]
    quant = evaluate_tasks(ctx.quant_runner, {task: config}, limit=n)[task]
    while True:
        drop = paired_drop(base, quant, metric)
        if (base.items < n or n >= cap or not above_chance(base, task, settings)  # near chance: more items judge nothing
                or not near_bar(drop.drop_pp, drop.stderr_pp, settings, task_sigmas(ctx))):
            break
        more = min(2 * n, cap)  # the next items of the same order, scored on both models, added to what is known
        base = merged(base, evaluate_tasks(ctx.base_runner, {task: config}, limit=more, model=ctx.baseline, start=n)[task])
        quant = merged(quant, evaluate_tasks(ctx.quant_runner, {task: config}, limit=more, start=n)[task])
        n = more
    chance = TASKS[task].chance
    base_acc, base_se = getattr(base, metric), getattr(base, f"{metric}_stderr")
    quant_acc, quant_se = getattr(quant, metric), getattr(quant, f"{metric}_stderr")
    above = above_chance(base, task, settings)
    print(f"accuracy {task}: {metric} {100 * quant_acc:.1f} % vs float {100 * base_acc:.1f} % on {drop.n} items, drop "
          f"{drop.drop_pp:+.2f} ± {drop.stderr_pp:.2f} points ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return TaskAccuracy(metric=metric, items=drop.n, chance=chance, base_acc=base_acc, base_acc_stderr=base_se,
                        quant_acc=quant_acc, quant_acc_stderr=quant_se, drop_pp=drop.drop_pp, drop_stderr_pp=drop.stderr_pp,
                        changed=drop.changed, above_chance=above, seconds=time.perf_counter() - start)


def task_result(name: str, t: TaskAccuracy, settings: AccuracySettings, sigmas: float | None) -> CriterionResult:
    below = t.drop_pp < settings.max_drop_pp
    if t.drop_stderr_pp > 0:
        margin = (settings.max_drop_pp - t.drop_pp) / t.drop_stderr_pp
    else:  # the two models answer every item alike: the drop is exact
        margin = float("inf") if below else float("-inf")
    ok, note = shown(margin, sigmas)
    how = how_close(margin) if t.drop_stderr_pp > 0 else "the same answer on every item"
    chance_note = "" if t.above_chance else f"; the float model is within the noise of chance ({100 * t.chance:.1f} %): reported, not judged"
    return CriterionResult(
        name=name, passed=below and ok, measured=t.drop_pp, threshold=f"< {settings.max_drop_pp:g} points drop",
        margin_sigmas=margin, binding=t.above_chance,
        detail=f"{t.metric} {100 * t.quant_acc:.1f} % vs {100 * t.base_acc:.1f} % ({t.drop_pp:+.2f} ± {t.drop_stderr_pp:.2f} points, "
               f"{t.items} items, {t.changed} changed; {how}{note}{chance_note})",
    )


def key(task: str, field: str) -> str:
    """A task's number in an attempt's flattened metrics (the validation report's measurements.accuracy)."""
    return f"measurements.accuracy.tasks.{task}.{field}"


def task_drops(metrics: Mapping[str, float]) -> dict[str, tuple[float, float | None]]:
    """{task: (drop, its standard error)} from an attempt's flattened metrics."""
    out = {}
    for k, v in metrics.items():
        parts = k.split(".")
        if len(parts) == 5 and parts[:3] == ["measurements", "accuracy", "tasks"] and parts[4] == "drop_pp":
            out[parts[3]] = (v, number(metrics, key(parts[3], "drop_stderr_pp")))
    return dict(sorted(out.items()))


def mean_drop(metrics: Mapping[str, float]) -> tuple[float | None, float | None]:
    """The mean drop over the tasks that carry a verdict (and its standard error), for one-number views."""
    drops = {t: d for t, d in task_drops(metrics).items() if metrics.get(key(t, "above_chance"), 1.0)}
    if not drops:
        return None, None
    se = [s for _, s in drops.values() if s is not None]
    mean = sum(d for d, _ in drops.values()) / len(drops)
    return mean, (sum(s * s for s in se) ** 0.5 / len(drops) if len(se) == len(drops) else None)


class Accuracy(Criterion):
    name = "accuracy"
    quality = True
    tip = ("benchmark accuracy is the binding limit: try QAT (it trains on the model's own outputs), mixed precision that "
           "keeps the most sensitive tensors at higher precision, or more representative calibration text")

    def applies(self, acceptance: AcceptanceCriteria) -> bool:
        return acceptance.accuracy is not None

    def check_inputs(self, spec: QualitySpec) -> None:
        if spec.acceptance.accuracy is not None:
            task_configs(expand(spec.acceptance.accuracy.tasks))  # a missing or corrupted benchmark: InputError

    def measure(self, ctx: MeasureContext) -> AccuracyMeasurement | None:
        settings = ctx.spec.acceptance.accuracy
        if settings is None:
            return None
        start = time.perf_counter()
        names = expand(settings.tasks)
        configs = task_configs(names)  # a missing or corrupted benchmark stops here, before any scoring
        base = {t: evaluate_tasks(ctx.base_runner, {t: configs[t]}, limit=settings.items, model=ctx.baseline)[t] for t in names}
        tasks: dict[str, TaskAccuracy] = {}
        skipped: dict[str, str] = {}
        for name in informative_first(base):
            if failed := [t for t, r in tasks.items() if r.above_chance and not self.task_passes(r, ctx)]:
                skipped[name] = f"the accuracy bar already fails on {failed[0]}"
                continue
            tasks[name] = measure_task(name, configs[name], ctx, settings)
        return AccuracyMeasurement(tasks=tasks, not_measured=skipped, seconds=time.perf_counter() - start,
                                   decide_sigmas=task_sigmas(ctx))

    @staticmethod
    def task_passes(t: TaskAccuracy, ctx: MeasureContext) -> bool:
        settings = ctx.spec.acceptance.accuracy
        return settings.measure_all or task_result("", t, settings, task_sigmas(ctx)).passed

    def judge(self, m: Measurements, acceptance: AcceptanceCriteria, sigmas: float | None) -> list[CriterionResult]:
        own = m.own.get(self.name)
        if own is None:
            return [CriterionResult(name=self.name, passed=False, measured=None, threshold=f"< {acceptance.accuracy.max_drop_pp:g} points drop",
                                    detail="not measured")]
        bar = f"< {acceptance.accuracy.max_drop_pp:g} points drop"
        sigmas = own.decide_sigmas if own.decide_sigmas is not None and sigmas is not None else sigmas
        return ([task_result(f"{self.name}:{task}", t, acceptance.accuracy, sigmas) for task, t in own.tasks.items()] +
                [CriterionResult(name=f"{self.name}:{task}", passed=False, measured=None, threshold=bar, binding=False,
                                 detail=f"not measured: {why}") for task, why in own.not_measured.items()])

    def cells(self, metrics: Mapping[str, float], where: Where) -> list[Cell]:
        mean, se = mean_drop(metrics)
        if where == "line":
            return [Cell("acc drop", fmt(mean, "{:+.2f} pt"), label="acc")]
        return [Cell("accuracy drop", "-" if mean is None else f"{mean:+.2f} pt" + (f" ± {se:.2f}" if se is not None else ""))]

    def section(self, rows: list[tuple[str, Mapping[str, float]]]) -> Section | None:
        """The report's accuracy table: a column per task, a row per measured attempt."""
        measured = [(label, m, drops) for label, m in rows if (drops := task_drops(m))]  # each row's metrics read once
        tasks = sorted({t for _, _, drops in measured for t in drops})
        if not tasks:
            return None
        body = []
        for label, m, drops in measured:
            cells = []
            for t in tasks:
                acc = number(m, key(t, "quant_acc"))
                d, s = drops.get(t, (None, None))
                cells.append("-" if acc is None else f"{100 * acc:.1f} % ({d:+.2f} ± {s or 0:.2f})")
            body.append([label, *cells])
        base = measured[0][1]
        float_row = ["float baseline", *(f"{100 * (number(base, key(t, 'base_acc')) or 0):.1f} % "
                                         f"(chance {100 * (number(base, key(t, 'chance')) or 0):.0f} %)" for t in tasks)]
        return Section("Benchmark accuracy", "accuracy on the same items as the float model, and the drop in points ± its "
                       "paired standard error; a task the float model does not beat chance on is reported, not judged",
                       ["attempt", *tasks], [float_row, *body])

    def summary(self, metrics: Mapping[str, float]) -> dict[str, float | None]:
        mean, se = mean_drop(metrics)
        out: dict[str, float | None] = {"accuracy_drop_pp": mean, "accuracy_drop_stderr_pp": se} if task_drops(metrics) else {}
        return out | {f"accuracy_drop_pp.{t}": d for t, (d, _) in task_drops(metrics).items()}

    def params(self, result: CriterionResult) -> dict[str, str]:
        return {f"{result.name}.binding": str(result.binding).lower()}

    def bar(self, acceptance: AcceptanceCriteria, where: Where) -> str | None:
        if acceptance.accuracy is None:
            return None
        rule = {"either": "either bar", "both": "both bars", "perplexity": "perplexity bar only", "accuracy": "accuracy bar only"}
        return (f"accuracy drop < {acceptance.accuracy.max_drop_pp:g} points on {', '.join(acceptance.accuracy.tasks)} "
                f"(quality: {rule[acceptance.quality]})")

    def describe_failure(self, c: CriterionResult) -> str:
        return f"{c.name.replace(':', ' on ')} {c.measured:+.2f} points (needs {c.threshold})"
