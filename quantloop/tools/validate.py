"""validate_quantization: measure a quantized model against its float baseline on the
runtime it is deployed with, and judge it against the acceptance criteria."""

from __future__ import annotations

from pathlib import Path

from quantloop.data.datasets import dataset_dir_or_default, manifest_digest, prepared_dataset_dirs
from quantloop.errors import InputError
from quantloop.eval.criteria.base import (MeasureContext, Measurements, can_still_pass, criteria, in_registry_order, judge,
                                          not_measured, verdict)
from quantloop.eval.criteria.perplexity import perplexity_criterion
from quantloop.eval.generation import check_generations
from quantloop.eval.sequential import boundary_for, doubling
from quantloop.eval.session import kld_in_rounds, open_runner, split_chunks
from quantloop.eval.size import gguf_size, hf_size, nominal_bits
from quantloop.eval.speed import ratio_and_stderr, speed_pairs, speed_threads
from quantloop.fileio import write_json_atomic
from quantloop.models.checkpoints import resolve_model
from quantloop.schemas import ValidationReport, ValidationRequest
from quantloop.specs import load_quality_spec

REPORT_NAME = "validation_report.json"


def domain_looks(spec, n_chunks: int, available: int) -> list[int]:
    """Chunk counts at which a text's perplexity bar is looked at: sequential, from eval.first_chunks doubling up to the
    cap (max_chunks, or n_chunks); else the fixed rule: n_chunks, doubled up to the cap while within the noise."""
    cap = min(max(spec.eval.max_chunks or n_chunks, n_chunks), available)
    return doubling(min(spec.eval.first_chunks, n_chunks) if spec.eval.sequential else n_chunks, cap)


def measure_domain(dataset_dir: Path, base, base_runner, quant_runner, spec, n_chunks: int, name: str):
    """(KLD report, chunks scored, the boundary its verdict uses) on one dataset's test split."""
    cap = max(spec.eval.max_chunks or n_chunks, n_chunks)
    chunks = split_chunks(dataset_dir, base, spec.eval.context, cap, fallback_runner=base_runner)
    looks = domain_looks(spec, n_chunks, len(chunks))
    c = boundary_for(looks, spec.eval.decide_sigmas, spec.eval.sequential)
    margin = lambda k: perplexity_criterion(k, spec.acceptance, None, name).margin_sigmas  # noqa: E731
    kld, scored = kld_in_rounds(base_runner, quant_runner, chunks, looks, margin, c, desc=f"KLD {name}")
    return kld, scored, c


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
    # the size bar's denominator is the same on both runtimes: the F16 file of the baseline's weights
    size_b = gguf_size(base.gguf) if base.gguf is not None else hf_size(base.hf_dir)
    f16_bytes = size_b.bytes_on_disk if base.gguf is not None else 2 * size_b.n_weights
    if runtime == "llama.cpp":
        size_q = gguf_size(quant.gguf)
        bits = req.nominal_bits or nominal_bits(size_q, quant_runner.ref.format.removeprefix("gguf:"))
    else:
        size_q = hf_size(quant.hf_dir)
        bits = req.nominal_bits
    acceptance, sigmas = spec.acceptance, spec.eval.decide_sigmas
    # cheap first: the size (read from the file), the test split's perplexity (always measured: every table leads with
    # it), the held-out texts, the generations, the criteria's own measurements (benchmark accuracy), speed last
    n_chunks = req.chunks or spec.eval.chunks
    kld, scored, c = measure_domain(dataset_dir, base, base_runner, quant_runner, spec, n_chunks, "perplexity")
    m = Measurements(kld=kld, size_ratio=f16_bytes / size_q.bytes_on_disk, bits=bits, boundaries={"perplexity": c})
    done = {"perplexity", "size"}
    skipped: dict[str, str] = {}  # result name -> why it was not measured

    def hopeless() -> str | None:
        """Why nothing left to measure can change the verdict (the attempt already fails), or None."""
        if req.full_report:
            return None
        results = judge(m, acceptance, sigmas, names=done)
        pending = [c.name for c in criteria() if c.applies(acceptance) and c.name not in done]
        if can_still_pass(results, pending, acceptance):
            return None
        failing = next((r.name.replace(":", " on ") for r in results if r.binding and not r.passed),
                       f"the quality rule ({acceptance.quality}): no bar it needs can hold")
        return f"the attempt already fails on {failing}, which this cannot change"

    held_chunks = req.held_out_chunks or req.chunks or spec.eval.chunks
    for d in held_out_dirs:
        name = f"perplexity:{d.name}"
        failing = [r.name.partition(":")[2] or "the test split" for r in judge(m, acceptance, sigmas, names={"perplexity"})
                   if not r.passed]
        if failing and not req.full_report:
            skipped[name] = f"perplexity already fails on {failing[0]}, which another text cannot change"
            continue
        m.held_out[d.name], _, m.boundaries[name] = measure_domain(d, base, base_runner, quant_runner, spec, held_chunks, name)
    if req.check_generation and (why := hopeless()):
        skipped["generation"] = why
    elif req.check_generation:
        m.generation = check_generations(quant_runner, base_runner, spec.generation)
    done.add("generation")
    context = MeasureContext(base, quant, base_runner, quant_runner, runtime, spec, dataset_dir)
    for crit in criteria():
        if not crit.applies(acceptance) or not crit.measures_own:
            continue
        if why := hopeless():
            skipped[crit.name] = why
        elif (own := crit.measure(context)) is not None:
            m.own[crit.name] = own
        done.add(crit.name)
    speed_b = speed_q = None
    if req.measure_speed and (why := hopeless()):
        skipped["speed"] = why
    elif req.measure_speed:
        speed_b, speed_q, m.speedup_tg_pairs, m.boundaries["speed"] = speed_pairs(
            base_runner.ref, quant_runner.ref, spec.speed, speed_threads(spec.speed), acceptance.min_speedup, sigmas,
            spec.eval.sequential)
        m.speedup_tg, m.speedup_tg_stderr = ratio_and_stderr(m.speedup_tg_pairs, spec.speed)
    done.add("speed")
    results = in_registry_order(judge(m, acceptance, sigmas, names=done - set(skipped)) + not_measured(skipped, acceptance))
    passed, carried_by = verdict(results, acceptance)
    report_path = Path(req.report_path) if req.report_path else (quant.path if quant.path.is_dir() else quant.path.parent) / REPORT_NAME
    report = ValidationReport(
        reference_note=base.reference_note,
        runtime=runtime,
        dataset=f"{dataset_dir} test split (manifest {manifest_digest(dataset_dir)}), {scored} x {ctx} tokens",
        baseline=base_runner.ref,
        quantized=quant_runner.ref,
        nominal_bits=bits,
        acceptance=spec.acceptance,
        kld=kld,
        held_out_kld=m.held_out,
        speed_baseline=speed_b,
        speed_quantized=speed_q,
        speedup_pp=speed_q.pp_tokens_per_s / speed_b.pp_tokens_per_s if speed_q else None,
        speedup_tg=m.speedup_tg, speedup_tg_pairs=m.speedup_tg_pairs, speedup_tg_stderr=m.speedup_tg_stderr,
        size_baseline=size_b,
        size_quantized=size_q,
        size_ratio=m.size_ratio,
        generation=m.generation,
        criteria=results,
        passed=passed,
        carried_by=carried_by if spec.acceptance.accuracy is not None else [],
        measurements={name: own.model_dump(mode="json") for name, own in m.own.items()},
        report_path=str(report_path),
    )
    write_json_atomic(report_path, report, fault="validation")
    return report
