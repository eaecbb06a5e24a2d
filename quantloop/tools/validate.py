"""validate_quantization: measure a quantized model against its float baseline on the
runtime it is deployed with, and judge it against the acceptance criteria."""

from __future__ import annotations

from pathlib import Path

from quantloop.data.datasets import dataset_dir_or_default, manifest_digest, prepared_dataset_dirs
from quantloop.errors import InputError
from quantloop.eval.criteria.base import MeasureContext, Measurements, criteria, judge, verdict
from quantloop.eval.criteria.perplexity import ppl_increase_stderr
from quantloop.eval.generation import check_generations
from quantloop.eval.session import kl_divergence, open_runner, split_chunks
from quantloop.eval.size import gguf_size, hf_size, nominal_bits
from quantloop.eval.speed import median_and_stderr, speed_pairs, speed_threads
from quantloop.fileio import write_json_atomic
from quantloop.models.checkpoints import resolve_model
from quantloop.schemas import ValidationReport, ValidationRequest
from quantloop.specs import load_quality_spec

REPORT_NAME = "validation_report.json"


def near_the_bar(kld, spec) -> bool:
    """The perplexity increase lies within decide_sigmas standard errors of its bar."""
    return abs(spec.acceptance.max_ppl_increase_pct - kld.ppl_increase_pct) < spec.eval.decide_sigmas * ppl_increase_stderr(kld)


def measure_domain(dataset_dir: Path, base, base_runner, quant_runner, spec, n_chunks: int):
    """(KLD report, chunks) on one dataset's test split: n_chunks, then more while within its noise of the bar."""
    ctx = spec.eval.context
    chunks = split_chunks(dataset_dir, base, ctx, n_chunks, fallback_runner=base_runner)
    kld = kl_divergence(base_runner, quant_runner, chunks)
    cap = spec.eval.max_chunks or len(chunks)
    while len(chunks) < cap and near_the_bar(kld, spec):  # within its noise of the bar: measure more before deciding
        more = split_chunks(dataset_dir, base, ctx, min(2 * len(chunks), cap), fallback_runner=base_runner)
        if len(more) == len(chunks):  # the test split has no more text
            break
        chunks = more
        kld = kl_divergence(base_runner, quant_runner, chunks)
    return kld, chunks


def validate_quantization(req: ValidationRequest) -> ValidationReport:
    spec = load_quality_spec(req.spec_file)
    for c in criteria():
        if c.applies(spec.acceptance):
            c.check_inputs(spec)
    quant = resolve_model(req.quantized)
    base = resolve_model(req.baseline)
    runtime = "llama.cpp" if quant.gguf is not None else "transformers"
    if runtime == "llama.cpp" and base.gguf is None:
        raise InputError(base.path, "baseline has no GGUF to compare a GGUF against on llama.cpp", "run `quantloop prepare` on the baseline")
    if runtime == "transformers" and base.hf_dir is None:
        raise InputError(base.path, "baseline has no transformers checkpoint", "pass a prepared checkpoint folder")
    dataset_dir = dataset_dir_or_default(req.dataset_dir)
    held_out_dirs = prepared_dataset_dirs(req.held_out)  # a missing domain fails before any measurement
    ctx = spec.eval.context
    base_runner = open_runner(base, runtime, ctx)
    quant_runner = open_runner(quant, runtime, ctx)
    if base_runner.n_vocab != quant_runner.n_vocab:
        raise InputError(quant.path, f"vocabulary of {quant_runner.n_vocab} tokens differs from the baseline's {base_runner.n_vocab}", "compare models that share a tokenizer")
    kld, chunks = measure_domain(dataset_dir, base, base_runner, quant_runner, spec, req.chunks or spec.eval.chunks)
    held_chunks = req.held_out_chunks or req.chunks or spec.eval.chunks
    held_out = {d.name: measure_domain(d, base, base_runner, quant_runner, spec, held_chunks)[0] for d in held_out_dirs}
    gen = check_generations(quant_runner, base_runner, spec.generation) if req.check_generation else None

    speed_b = speed_q = None
    ratios: list[float] = []
    if req.measure_speed:
        speed_b, speed_q, ratios = speed_pairs(base_runner.ref, quant_runner.ref, spec.speed, speed_threads(spec.speed),
                                               spec.acceptance.min_speedup, spec.eval.decide_sigmas)
    # the size bar's denominator is the same on both runtimes: the F16 file of the baseline's weights
    size_b = gguf_size(base.gguf) if base.gguf is not None else hf_size(base.hf_dir)
    f16_bytes = size_b.bytes_on_disk if base.gguf is not None else 2 * size_b.n_weights
    if runtime == "llama.cpp":
        size_q = gguf_size(quant.gguf)
        bits = req.nominal_bits or nominal_bits(size_q, quant_runner.ref.format.removeprefix("gguf:"))
    else:
        size_q = hf_size(quant.hf_dir)
        bits = req.nominal_bits
    median_ratio, ratio_se = median_and_stderr(ratios) if ratios else (None, None)
    context = MeasureContext(base, quant, base_runner, quant_runner, runtime, spec, dataset_dir)
    parts = Measurements(kld=kld, held_out=held_out, speedup_tg=median_ratio, speedup_tg_stderr=ratio_se, speedup_tg_pairs=ratios,
                         size_ratio=f16_bytes / size_q.bytes_on_disk, bits=bits, generation=gen,
                         own={c.name: own for c in criteria() if (own := c.measure(context)) is not None})
    results = judge(parts, spec.acceptance, spec.eval.decide_sigmas)
    passed, carried_by = verdict(results, spec.acceptance)
    report_path = Path(req.report_path) if req.report_path else (quant.path if quant.path.is_dir() else quant.path.parent) / REPORT_NAME
    report = ValidationReport(
        reference_note=base.reference_note,
        runtime=runtime,
        dataset=f"{dataset_dir} test split (manifest {manifest_digest(dataset_dir)}), {len(chunks)} x {ctx} tokens",
        baseline=base_runner.ref,
        quantized=quant_runner.ref,
        nominal_bits=bits,
        acceptance=spec.acceptance,
        kld=kld,
        held_out_kld=held_out,
        speed_baseline=speed_b,
        speed_quantized=speed_q,
        speedup_pp=speed_q.pp_tokens_per_s / speed_b.pp_tokens_per_s if speed_q else None,
        speedup_tg=parts.speedup_tg, speedup_tg_pairs=ratios, speedup_tg_stderr=ratio_se,
        size_baseline=size_b,
        size_quantized=size_q,
        size_ratio=parts.size_ratio,
        generation=gen,
        criteria=results,
        passed=passed,
        carried_by=carried_by if spec.acceptance.accuracy is not None else [],
        measurements={name: own.model_dump(mode="json") for name, own in parts.own.items()},
        report_path=str(report_path),
    )
    write_json_atomic(report_path, report, fault="validation")
    return report
