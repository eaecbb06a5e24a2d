"""What the knowledge store says about a planned step: the attempts of the same spec on this model and on the
other checkpoints of its family, turned into a skip (with its reason) or into evidence the attempt line cites.

A step is skipped only when the outcome is already known: the same spec failed on the same weights against the
same acceptance spec, on criteria that measure the same way twice (not speed, whose verdict is noisy), or it
could not run on an input of the same family (an architecture or shape it does not support). Anything else
learned on the family (passed, failed on a fine-tune) is evidence, never a reason to skip.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

from quantloop.agents.state import Attempt, PipelineState, PlannedAttempt
from quantloop.knowledge.atoms import AttemptFact, FrontFact, ModelFact
from quantloop.knowledge.identity import model_fact
from quantloop.knowledge.store import KnowledgeStore
from quantloop.models.checkpoints import resolve_model
from quantloop.search.schemas import SearchResult

NOISY = ("speed",)  # criteria whose verdict may change when measured again on the same file


@dataclass
class Lesson:
    skip: str | None = None
    evidence: list[str] = field(default_factory=list)


def spec_key(planned: PlannedAttempt) -> str:
    """The spec's tag and a digest of all of it: two attempts share it only when they quantize the same way."""
    if planned.spec is None:
        return f"{planned.kind}:{planned.step.split('@')[0]}"
    full = planned.spec.model_dump_json()
    return f"{planned.spec.tag()}#{hashlib.sha256(full.encode()).hexdigest()[:10]}"


@lru_cache(maxsize=64)
def checkpoint_fact(path: str) -> ModelFact | None:
    model = resolve_model(path)
    return model_fact(model) if model.hf_dir is not None else None


def failed_criteria(f: AttemptFact) -> list[str]:
    """The criteria that failed on a measurement (a criterion not measured once the attempt had failed is not one)."""
    return [k.split(":", 1)[1] for k in f.metrics if k.startswith("failed:") and f.metrics[k] == 1.0]


def failed_noisily(f: AttemptFact) -> bool:
    """A criterion whose verdict may change when measured again failed on a measurement (not for want of one)."""
    return any(c in NOISY for c in failed_criteria(f))


def lessons(memory: KnowledgeStore | None, planned: PlannedAttempt, state: PipelineState) -> Lesson:
    if memory is None or not memory.enabled or not planned.checkpoint:
        return Lesson()
    model = checkpoint_fact(planned.checkpoint)
    if model is None:
        return Lesson()
    key, out = spec_key(planned), Lesson()
    for m in [model] + memory.related(model):
        same = m.digest == model.digest
        for f in memory.facts("Attempt", digest=m.digest, tag=key):
            if f.run_id == state.run_id:
                continue
            where = "this model" if same else f"{m.name} (same family)"
            failed = failed_criteria(f)
            if (same and f.status == "validated" and not f.passed and failed and not failed_noisily(f)
                    and f.acceptance == state.acceptance_sha256):
                saved = f", saving about {f.metrics['wall_s']:.0f} s" if f.metrics.get("wall_s") else ""
                out.skip = (f"memory: the same spec failed on this model against the same acceptance spec in run {f.run_id} "
                            f"({f.reason.split('; next:')[0]}){saved}; run with --no-memory to try it again")
            elif f.status == "skipped" and f.reason and "cannot run on this input" in f.reason:
                out.skip = f"memory: {f.reason.split('; next:')[0]} (on {where}, run {f.run_id})"
            else:
                verdict = "passed" if f.passed else f.status if f.status != "validated" else "failed on " + (", ".join(failed) or "?")
                out.evidence.append(f"{verdict} on {where} in run {f.run_id}")
            if out.skip:
                return out
    return out


def attempt_fact(a: Attempt, planned: PlannedAttempt, state: PipelineState, model: ModelFact) -> AttemptFact:
    metrics = ({f"failed:{c.name}": 0.0 if c.measured is None else 1.0 for c in a.criteria if not c.passed}  # 0: not measured
               | {f"passed:{c.name}": 1.0 for c in a.criteria if c.passed})
    metrics["wall_s"] = round(a.wall_s, 2)
    reason = a.reason if a.status != "skipped" else f"{a.step} was skipped: {a.note}"
    return AttemptFact(digest=model.digest, run_id=state.run_id, step=a.step, tag=spec_key(planned), method=a.method or a.kind,
                       status=a.status, verdict=a.verdict or "", passed=a.passed, reason=reason, metrics=metrics,
                       acceptance=state.acceptance_sha256)


def remember_attempt(memory: KnowledgeStore | None, state: PipelineState, a: Attempt) -> bool:
    """The attempt just reviewed, and its checkpoint, into the store, saved at once. False when not recorded."""
    if memory is None or not memory.enabled or not a.checkpoint:
        return False
    model = checkpoint_fact(a.checkpoint)
    if model is None:
        return False
    if a.note.startswith("memory:"):  # skipped because of the store: it says nothing new
        return False
    memory.put(model)
    memory.put(attempt_fact(a, state.plan[a.index], state, model))
    memory.save()
    return True


def remember_front(memory: KnowledgeStore | None, planned: PlannedAttempt, result_json) -> int:
    """The measured front of a search result (on the planned checkpoint) into the store, saved at once. New atoms."""
    if memory is None or not memory.enabled:
        return 0
    model = checkpoint_fact(planned.checkpoint)
    if model is None:
        return 0
    result = SearchResult.model_validate_json(open(result_json).read())
    new = int(memory.put(model))
    for m in result.front:
        new += memory.put(FrontFact(digest=model.digest, study=f"{result.study}:{result_json}", trial=m.trial,
                                    kld_mean=m.measured.kld_mean, bytes=m.measured.bytes,
                                    bits_per_weight=m.measured.bits_per_weight, tg_tokens_per_s=m.measured.tg_tokens_per_s,
                                    genome=m.measured.genome))
    memory.save()
    return new
