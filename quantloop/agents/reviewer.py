"""ReviewerAgent: apply the acceptance criteria to the last attempt; accept it, or pick the next
fallback step and say why in one sentence naming the failing measurement(s); when the plan is
exhausted, reject and recommend what a person should try."""

from __future__ import annotations

from quantloop.agents.state import Attempt, PipelineState
from quantloop.eval.criteria.base import criterion_for, tips
from quantloop.schemas import CriterionResult


def describe_failure(c: CriterionResult) -> str:
    if c.measured is None:
        return f"{c.name} not measured (needs {c.threshold})"
    return criterion_for(c.name).describe_failure(c)


def failing_measurements(attempt: Attempt) -> str:
    failing = [c for c in attempt.criteria if not c.passed and c.binding] or [c for c in attempt.criteria if not c.passed]
    return " and ".join(describe_failure(c) for c in failing)


def bound_by(attempts: list[Attempt]) -> list[str]:
    """The bars that bound: the criteria failing (binding results) on the last measured attempt."""
    measured = [a for a in attempts if a.status == "validated"]
    if not measured:
        return []
    return list(dict.fromkeys(c.name.split(":")[0] for c in measured[-1].criteria if not c.passed and c.binding))


def recommendation(attempts: list[Attempt]) -> str:
    """What a person should try, from which criteria failed on the attempts that were measured."""
    measured = [a for a in attempts if a.status == "validated"]
    crashed = [f"{a.step} {a.note}" for a in attempts if a.status == "failed"]
    crash_tip = (f" A quantizer crashed, which is a bug to fix or report, not a property of the model: {'; '.join(crashed)[:600]}."
                 if crashed else "")
    if not measured:
        return ("No step could run (" + "; ".join(f"{a.step}: {a.note}" for a in attempts if a.note)[:600] +
                "); install or build the missing quantizers, or add steps that are available to the policy." + crash_tip)
    failed = {c.name.split(":")[0] for a in measured for c in a.criteria if not c.passed and c.binding}
    what = tips(failed)  # one per failing criterion, in the registry's order
    bound = bound_by(attempts)
    bars = f"The bar that bound the last attempt: {' and '.join(bound)}. " if bound else ""
    advice = "; ".join(what) + "." if what else "Review the attempts' reports."
    return bars + (advice[:1].upper() + advice[1:] if bars else advice) + crash_tip


def cite(a: Attempt) -> str:
    """The knowledge store's evidence the decision took into account, as one clause (empty when there is none)."""
    return f" Memory: {'; '.join(a.evidence)}." if a.evidence else ""


class ReviewerAgent:
    """Judges the last attempt from its validation report and cites the store's evidence on the same step."""

    def __call__(self, state: PipelineState) -> dict:
        attempts = list(state.attempts)
        last = attempts[-1]
        remaining = state.plan[state.next_index:]
        next_step = remaining[0].step if remaining else None
        if last.status == "validated" and last.passed:
            every = all(c.passed for c in last.criteria if c.binding)
            verdict = "accepted"
            reason = f"{last.step} passes {'every acceptance criterion' if every else 'the acceptance bar'} ({self.passing_summary(last)})."
        elif last.status == "skipped":
            verdict = "skipped"
            reason = f"{last.step} was skipped: {last.note}" + (f"; next: {next_step}." if next_step else "; the plan is exhausted.")
        elif last.status == "failed":  # a crash: recorded as a failure with its error, then the next step
            verdict = "fallback" if next_step else "rejected"
            reason = f"{last.step} failed: {last.note}" + (f"; next: {next_step}." if next_step else "; the plan is exhausted.")
        else:
            verdict = "fallback" if next_step else "rejected"
            then = f"next: {next_step}" if next_step else "the plan is exhausted"
            reason = f"{last.step} fails on {failing_measurements(last)}; {then}."
        attempts[-1] = last.model_copy(update={"verdict": verdict, "reason": reason + cite(last)})
        update: dict = {"attempts": attempts}
        if verdict == "accepted":
            update.update(decision="accepted", accepted_index=last.index)
        elif not remaining:
            update.update(decision="rejected", recommendation=recommendation(attempts))
        return update

    @staticmethod
    def passing_summary(a: Attempt) -> str:
        """Every result; when the quality bars were measured (acceptance.quality), which of them carried the pass and
        which failed without deciding it."""
        text = ", ".join(f"{c.name} {c.detail}" for c in a.criteria if c.passed or not c.binding)
        if not a.carried_by:
            return text
        unused = [c for c in a.criteria if not c.passed and c.binding]
        return (f"quality carried by {' and '.join(a.carried_by)}; " + text +
                (f"; not needed under the quality rule: {' and '.join(describe_failure(c) for c in unused)}" if unused else ""))
