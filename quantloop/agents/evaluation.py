"""EvaluationAgent: find the candidate checkpoints, score each on the validation split,
rank them, and turn the policy into the attempt plan for the best one."""

from __future__ import annotations

import re
import time
from pathlib import Path

from quantloop.agents.policy import Policy
from quantloop.agents.state import CheckpointScore, PipelineState, PlannedAttempt
from quantloop.benchmarks.score import evaluate_tasks
from quantloop.benchmarks.tasks import TASKS, expand, task_configs
from quantloop.data.datasets import read_split
from quantloop.errors import InputError
from quantloop.eval.perplexity import make_chunks
from quantloop.eval.session import open_runner, perplexity
from quantloop.eval.size import gguf_size, hf_size
from quantloop.eval.speed import measure_speed, speed_threads
from quantloop.models.checkpoints import ResolvedModel, load_hf_tokenizer, resolve_model
from quantloop.names import check_name, under
from quantloop.specs import load_quality_spec

STEP_DIR = re.compile(r"^step[_-]?(\d+)$")


def find_checkpoints(path: str | Path) -> list[Path]:
    """A model folder or file is one candidate; a folder of model folders (step_N, ...) gives each of them."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "path not found", "pass a prepared checkpoint folder or a folder of step_N checkpoints")
    is_model = path.is_file() or (path / "config.json").is_file() or any(path.glob("*.gguf"))
    if is_model:
        return [path]
    subs = [p for p in sorted(path.iterdir()) if p.is_dir() and ((p / "config.json").is_file() or any(p.glob("*.gguf")))]
    if not subs:
        raise InputError(path, "folder holds no checkpoints (no config.json or .gguf in it or in its subfolders)",
                         "pass a checkpoint folder or a folder of step_N checkpoints")
    return sorted(subs, key=lambda p: (training_step(p) is None, training_step(p) or 0, p.name))


def training_step(path: Path) -> int | None:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def checkpoint_name(model: ResolvedModel) -> str:
    if training_step(model.path) is not None:
        return f"{model.path.parent.name}-{model.path.name}"
    return model.manifest.name if model.manifest else model.path.stem


def validation_chunks(dataset_dir: Path, model: ResolvedModel, runner, context: int, chunks: int):
    """The validation split cut into chunks (checkpoint selection never looks at the test split)."""
    text = read_split(Path(dataset_dir), "validation")
    ids = load_hf_tokenizer(model.hf_dir)(text, add_special_tokens=False)["input_ids"] if model.hf_dir else runner.tokenize(text)
    out = make_chunks(ids, context, chunks)
    if not out:
        raise InputError(Path(dataset_dir) / "validation.txt", f"validation split too short for one {context}-token chunk",
                         "prepare the dataset from more text")
    return out


def runtime_for(model: ResolvedModel, target: str) -> str:
    return "llama.cpp" if target == "cpu" and model.gguf is not None else "transformers"


def score_checkpoint(path: Path, target: str, policy: Policy, spec_file: str, dataset_dir: str) -> CheckpointScore:
    """The float baseline report of one checkpoint: validation perplexity, size, speed on the target's runtime."""
    t0 = time.perf_counter()
    quality = load_quality_spec(spec_file)
    model = resolve_model(path)
    runtime = runtime_for(model, target)
    runner = open_runner(model, runtime, quality.eval.context)
    chunks = validation_chunks(Path(dataset_dir), model, runner, quality.eval.context, policy.validation.selection_chunks)
    ppl = perplexity(runner, chunks, desc=f"validation ppl {model.path.name}")
    size = gguf_size(model.gguf) if runtime == "llama.cpp" else hf_size(model.hf_dir)
    speed = measure_speed([runner.ref], quality.speed, speed_threads(quality.speed))[0] if policy.validation.measure_speed else None
    accuracy = mean_accuracy(runner, model, policy) if policy.validation.rank_by == "accuracy" else None
    return CheckpointScore(name=checkpoint_name(model), path=str(model.path), training_step=training_step(model.path),
                           validation_ppl=ppl, size=size, speed=speed, accuracy=accuracy, wall_s=time.perf_counter() - t0)


def mean_accuracy(runner, model: ResolvedModel, policy: Policy) -> float:
    """Mean accuracy (each task's usual metric) over the policy's rank_tasks, on the last rank_items items of each
    task's fixed order: items the acceptance bar, which scores the first ones, does not look at first."""
    names = expand(policy.validation.rank_tasks)
    scores = evaluate_tasks(runner, task_configs(names), limit=policy.validation.rank_items, model=model, from_end=True)
    return sum(getattr(scores[t], TASKS[t].metric) for t in names) / len(names)


def rank_key(policy: Policy):
    """Best first: lowest validation perplexity, or highest benchmark accuracy (then perplexity); a later step breaks ties."""
    if policy.validation.rank_by == "accuracy":
        return lambda c: (-(c.accuracy if c.accuracy is not None else float("-inf")), c.validation_ppl.ppl, -(c.training_step or 0))
    return lambda c: (c.validation_ppl.ppl, -(c.training_step or 0))


def output_folder(root: Path, index: int, checkpoint: CheckpointScore, step_name: str, kind: str, spec) -> str:
    """The attempt's own folder in the run's folder: <index>-<checkpoint>_<tag> (the index makes it unique in the run;
    the run's folder makes it unique among runs, so no run ever writes into another's files)."""
    if kind == "search":  # no spec before the search picks one: the step's own name
        tag = f"search-{step_name.split('@')[0]}"
    else:
        tag = ("qat-" if kind == "qat" else "") + spec.tag()
    name = check_name(checkpoint.name, "checkpoint name", "rename the checkpoint folder")
    return str(under(root, f"{index}-{name}_{tag}", what="attempt folder"))


def build_plan(policy: Policy, ranked: list[CheckpointScore], output_root: Path) -> list[PlannedAttempt]:
    """The policy's steps on the best checkpoint; a next_checkpoint step repeats its `retry` steps on the runner-up."""
    steps = policy.plan_steps()
    plan: list[PlannedAttempt] = []

    def add(step, checkpoint: CheckpointScore | None) -> None:
        writes_files = checkpoint and (step.spec or step.search)
        out = output_folder(output_root, len(plan), checkpoint, step.name, step.kind, step.spec) if writes_files else None
        plan.append(PlannedAttempt(index=len(plan), step=step.name, kind=step.kind, spec=step.spec, skip=step.skip,
                                   expect_minutes=step.expect_minutes, past_budget=step.past_budget, checkpoint=checkpoint.path if checkpoint else "", output_dir=out))

    for step in steps:
        if step.kind != "next_checkpoint":
            add(step, ranked[0])
            continue
        if len(ranked) < 2:
            add(step, None)  # recorded as skipped: there is no other checkpoint
            continue
        retry = step.retry or [s.name for s in steps if s.kind == "quantize"]
        for s in steps:
            if s.name in retry:
                add(s.model_copy(update={"name": f"{s.name}@{ranked[1].name}"}), ranked[1])
    return plan


class EvaluationAgent:
    """Scores every candidate checkpoint once, keeps the scores in the state, selects the best, plans the attempts."""

    def __call__(self, state: PipelineState) -> dict:
        by_path = {c.path: c for c in state.candidates}
        scores = []
        for path in find_checkpoints(state.model):
            cached = by_path.get(str(path))
            scores.append(cached or score_checkpoint(path, state.target, state.policy, state.acceptance_spec, state.dataset_dir))
        ranked = sorted(scores, key=rank_key(state.policy))
        plan = state.plan or build_plan(state.policy, ranked, Path(state.run_dir or state.output_root))
        return {"candidates": ranked, "plan": plan}
