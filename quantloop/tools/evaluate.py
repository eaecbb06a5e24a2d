"""evaluate_model: the float baseline report of one model (perplexity on every runtime
it has files for, speed, size, generation checks)."""

from __future__ import annotations

from quantloop.data.datasets import dataset_dir_or_default, manifest_digest
from quantloop.eval.generation import check_generations
from quantloop.eval.session import open_runner, perplexity, split_chunks
from quantloop.eval.size import gguf_size, hf_size
from quantloop.eval.speed import measure_speed, speed_threads
from quantloop.models.checkpoints import resolve_model
from quantloop.schemas import EvaluateRequest, EvaluationReport
from quantloop.specs import load_quality_spec


def evaluate_model(req: EvaluateRequest) -> EvaluationReport:
    spec = load_quality_spec(req.spec_file)
    model = resolve_model(req.model)
    runtimes = req.runtimes or [r for r, have in (("transformers", model.hf_dir), ("llama.cpp", model.gguf)) if have is not None]
    dataset_dir = dataset_dir_or_default(req.dataset_dir)
    ctx = spec.eval.context
    runners = [open_runner(model, r, ctx) for r in runtimes]
    chunks = split_chunks(dataset_dir, model, ctx, req.chunks or spec.eval.chunks, fallback_runner=runners[-1])
    ppl = [perplexity(r, chunks, desc=f"perplexity ({r.runtime})") for r in runners]
    gen_runner = runners[-1]  # llama.cpp when the model has a GGUF: the deployment runtime
    gen = check_generations(gen_runner, gen_runner, spec.generation) if req.check_generation else None
    speed = measure_speed([r.ref for r in runners], spec.speed, speed_threads(spec.speed)) if req.measure_speed else []
    size = gguf_size(model.gguf) if model.hf_dir is None else hf_size(model.hf_dir)
    return EvaluationReport(
        reference_note=model.reference_note,
        dataset=f"{dataset_dir} test split (manifest {manifest_digest(dataset_dir)}), {len(chunks)} x {ctx} tokens",
        perplexity=ppl,
        speed=speed,
        size=size,
        generation=gen,
    )
