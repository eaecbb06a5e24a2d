"""A policy step of kind search: quantize to the precision map a mixed-precision search found best within a
bits-per-weight budget.

The step reads a finished search's result (`quantloop search` writes search_result.json) or, when there is
none, runs a short search on the attempt's checkpoint first (next to the attempt's folder, in `<folder>.search`:
the attempt's own folder is replaced when the model is written). Of the search's front it takes the member with
the lowest measured KLD that fits `max_bpw` (and `max_kld`), tools/search.py's best_precision_map_for_budget, and hands that
map to quantize_model like any quantize step. No member fits: the attempt is skipped with the reason.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field

from quantloop.data.datasets import prepared_dataset_dirs
from quantloop.errors import InputError, crash_line
from quantloop.eval.criteria.size import required_size_ratio
from quantloop.gguf.llamacpp import read_metadata
from quantloop.models.checkpoints import resolve_model
from quantloop.paths import PROJECT_ROOT
from quantloop.schemas import Strict
from quantloop.search.schemas import SearchRequest, SearchResult, TextSpec
from quantloop.search.study import open_storage, study_exists
from quantloop.search.tensors import model_tensors
from quantloop.specs import load_quality_spec
from quantloop.tools.search import (
    best_precision_map_for_budget,
    imatrix_calibration,
    member_kld,
    member_spec,
    search_mixed_precision,
)

SEARCH_STUDY = "policy-search"
RESULT_NAME = "search_result.json"


class SearchStep(Strict):
    """What a search step picks from, its budget, and the short search it runs when there is no result yet."""

    result: str | None = Field(None, description="a finished search's search_result.json (relative: to the working folder, "
                                                 "then to the repository root); missing: a short search runs on the checkpoint")
    max_bpw: float | None = Field(None, gt=0, description="bits per weight of the picked front member at most (default: the "
                                                          "INT4 size bar in bits per weight of the checkpoint's file, 4.499 on SmolLM2)")
    max_kld: float | None = Field(None, gt=0, description="mean KLD of the picked member at most (test split where validated)")
    text: list[str] = Field(default_factory=list, description="prepared datasets (names under SLM/datasets, or folders) the short "
                                                              "search measures on (default: the run's dataset)")
    types: list[str] | None = Field(None, description="candidate GGUF types of the short search (default: the search's own list)")
    granularity: Literal["group", "block", "tensor"] = "group"
    budgets_bpw: list[float] = Field(default_factory=list, description="seed budgets of the short search (default: max_bpw)")
    trials: int = Field(8, ge=1, description="measured trials of the short search")
    population: int = Field(4, ge=2)
    chunks: int = Field(1, ge=1, description="windows per domain and split the short search scores")
    seqlen: int = Field(256, ge=16)
    imatrix_chunks: int = Field(32, ge=0, description="windows of seqlen calibration tokens for the candidates' importance "
                                                       "matrix (llama-imatrix, cached); 0: none")
    speed_tokens: int = Field(16, ge=1)
    speed_repeats: int = Field(1, ge=1)
    validate_front: int = Field(2, ge=0, description="front members the short search re-validates on the test split")
    seed: int = 0


def search_settings(policy, step_name: str) -> SearchStep:
    """The `search` block of the policy step a planned attempt came from (a retry on the next checkpoint is 'name@checkpoint')."""
    name = step_name.split("@")[0]
    return next(s.search for s in policy.plan_steps() if s.name == name)


def budget_bpw(settings: SearchStep, acceptance_spec: str | Path, checkpoint: str | Path) -> float:
    """The step's max_bpw, or the INT4 size bar of the checkpoint as bits per weight: the whole file at most its
    F16 GGUF's bytes / the bar, less the header (tokenizer and metadata), over all weights (about 4.49 on SmolLM2
    at 3.5x, not 16 / 3.5)."""
    if settings.max_bpw is not None:
        return settings.max_bpw

    gguf = resolve_model(checkpoint).gguf
    if gguf is None:
        raise InputError(Path(checkpoint), "a search step without max_bpw needs the model's F16 GGUF", "run `quantloop prepare` on it")
    ratio = required_size_ratio(load_quality_spec(acceptance_spec).acceptance, 4)
    header = read_metadata(gguf).data_offset
    return math.floor(8000 * (gguf.stat().st_size / ratio - header) / model_tensors(gguf).n_weights) / 1000  # down: within the bar


def existing_result(settings: SearchStep) -> Path | None:
    """The step's result file where it exists (relative: the working folder first, then the repository root)."""
    if settings.result is None:
        return None
    return next((p for p in (Path(settings.result), PROJECT_ROOT / settings.result) if p.is_file()), None)


def search_request(settings: SearchStep, checkpoint: str, dataset_dir: str, budget: float, out_dir: Path):
    dirs = prepared_dataset_dirs(settings.text) if settings.text else [Path(dataset_dir)]

    def texts(split: str) -> list[TextSpec]:
        return [TextSpec(dataset_dir=str(d), split=split, chunks=settings.chunks, seqlen=settings.seqlen) for d in dirs]

    journal = out_dir / "search.journal"
    resume = journal.is_file() and study_exists(open_storage(str(journal)), SEARCH_STUDY)  # a run killed inside the search
    types = {"types": settings.types} if settings.types else {}
    return SearchRequest(model=checkpoint, text=texts("validation"), sensitivity_text=texts("calibration"), test_text=texts("test"),
                         granularity=settings.granularity, budgets_bpw=settings.budgets_bpw or [budget], max_bpw=budget,
                         trials=settings.trials, population=settings.population, out_dir=str(out_dir), study=SEARCH_STUDY,
                         resume=resume, speed_tokens=settings.speed_tokens, speed_repeats=settings.speed_repeats,
                         validate_front=settings.validate_front, seed=settings.seed, **types,
                         imatrix=imatrix_calibration(texts("calibration"), settings.imatrix_chunks, settings.seqlen)
                         if settings.imatrix_chunks else None)


def finished_search(settings: SearchStep, planned, dataset_dir: str, budget: float) -> tuple[Path, str]:
    """The result file to pick from and how it was found: the step's result, or a short search's (run now unless an
    earlier try of this attempt finished it)."""
    found = existing_result(settings)
    if found is not None:
        return found, f"search result {found}"
    out_dir = Path(f"{planned.output_dir}.search")
    own = out_dir / RESULT_NAME
    missing = f"{settings.result} not found: " if settings.result else ""
    if not own.is_file():
        own = Path(search_mixed_precision(search_request(settings, planned.checkpoint, dataset_dir, budget, out_dir)).result_json)
    return own, f"{missing}searched {settings.trials} trials, result {own}"


def no_fit_reason(result_json: Path, budget: float, max_kld: float | None) -> str:
    front = SearchResult.model_validate_json(result_json.read_text()).front
    kld = f" and a mean KLD of at most {max_kld:g}" if max_kld is not None else ""
    if not front:
        return f"the search {result_json} has an empty front: nothing fits {budget:g} bits per weight{kld}"
    small = min(front, key=lambda m: m.measured.bits_per_weight)
    return (f"no front member of {result_json} fits {budget:g} bits per weight{kld}: the smallest, trial {small.trial}, "
            f"has {small.measured.bits_per_weight:.3f} bits per weight; raise max_bpw or run a search with smaller types")


def member_note(member, found: str) -> str:
    kld = member_kld(member)
    return (f"front member trial {member.trial} ({member.origin}, {member.measured.bits_per_weight:.3f} bits per weight, "
            f"mean KLD {kld:.4f}), map {member.map_yaml}; {found}")


def search_failure(planned, err: Exception, skip: Callable):
    """The attempt when the search itself could not run: skipped for bad input (a missing tool too), failed for a crash."""
    if isinstance(err, InputError):
        return skip(planned, f"the search cannot run on this input: {err.line()}")
    return skip(planned, f"the search failed: {crash_line(err)}", status="failed")


def search_attempt(planned, state, quantize: Callable, skip: Callable, on_result: Callable | None = None):
    """The attempt of a search step (planned: a PlannedAttempt without a spec; state: the PipelineState): pick the map
    from the step's result, or from a short search run now, and quantize to it with `quantize` (the QuantizationAgent's
    attempt, given the planned attempt with the map as its spec), or `skip` it with the reason. The note names the
    front member; on_result(planned, result_json) sees the result file first. (The agent passes these in: this module
    is imported by policy.py and imports no agent.)"""
    settings = search_settings(state.policy, planned.step)
    t0 = time.perf_counter()
    try:
        budget = budget_bpw(settings, state.acceptance_spec, planned.checkpoint)
        result_json, found = finished_search(settings, planned, state.dataset_dir, budget)
        if on_result is not None:
            on_result(planned, result_json)
        member = best_precision_map_for_budget(result_json, budget, settings.max_kld)
        spec = None if member is None else member_spec(member)
    except Exception as e:  # noqa: BLE001 — the loop goes on; the attempt records why
        return search_failure(planned, e, skip)
    if spec is None:
        return skip(planned, no_fit_reason(result_json, budget, settings.max_kld))
    search_s = time.perf_counter() - t0
    attempt = quantize(planned.model_copy(update={"spec": spec}), state)
    note = member_note(member, found) + (f"; {attempt.note}" if attempt.note else "")
    return attempt.model_copy(update={"note": note, "bits": None, "wall_s": attempt.wall_s + search_s})
