"""The measurement tools end to end on a tiny random Llama (real transformers, real llama.cpp)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from quantloop.backends.gguf import quantize_gguf
from quantloop.eval.runtimes import LlamaCppRunner, TransformersRunner
from quantloop.eval.session import perplexity, split_chunks
from quantloop.models.checkpoints import resolve_model
from quantloop.schemas import CompareRequest, EvaluateRequest, ValidationRequest
from quantloop.tools import compare_outputs, evaluate_model, validate_quantization

ROOT = Path(__file__).resolve().parent.parent
from spec_helpers import validation_spec


def test_prepared_checkpoint_loads_offline_and_matches_its_gguf(tiny_prepared, dataset_dir):
    from transformers import AutoModelForCausalLM

    manifest = json.loads((tiny_prepared / "quantloop_model.json").read_text())
    assert manifest["gguf_f16"] == "tiny-f16.gguf" and manifest["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(tiny_prepared, local_files_only=True)
    assert next(model.parameters()).dtype == torch.float32
    m = resolve_model(tiny_prepared)
    chunks = split_chunks(dataset_dir, m, 512, 2)
    hf = perplexity(TransformersRunner(tiny_prepared), chunks, "hf")
    cpp = perplexity(LlamaCppRunner(m.gguf), chunks, "cpp")
    assert hf.tokens_scored == cpp.tokens_scored == 2 * 255
    assert abs(cpp.ppl / hf.ppl - 1) < 0.005  # same token ids, same chunking: runtimes agree within 0.5 %


def test_same_token_ids_on_both_runtimes(tiny_prepared):
    m = resolve_model(tiny_prepared)
    text = "To be, or not to be, that is the question."
    assert TransformersRunner(tiny_prepared).tokenize(text) == LlamaCppRunner(m.gguf).tokenize(text)


def test_validate_q8_0_writes_a_complete_report(tiny_copy, dataset_dir, tmp_path):
    q = quantize_gguf(tiny_copy / "tiny-f16.gguf", tmp_path / "tiny-q8_0.gguf", "Q8_0")
    spec = yaml.safe_load((ROOT / "specs" / "acceptance.yaml").read_text())  # the default spec, 10 benchmark items per task
    spec["acceptance"]["accuracy"] |= {"items": 10, "max_items": 10}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    # the tiny file fails the size bar (its tokenizer metadata dominates), which nothing measured later can change:
    # full_report measures every criterion anyway
    r = validate_quantization(ValidationRequest(quantized=str(q), baseline=str(tiny_copy), dataset_dir=str(dataset_dir), chunks=2,
                                                spec_file=str(tmp_path / "spec.yaml"), full_report=True))
    saved = json.loads((tmp_path / "validation_report.json").read_text())
    assert saved["passed"] == r.passed
    assert r.runtime == "llama.cpp" and r.quantized.format == "gguf:Q8_0" and r.baseline.format == "gguf:F16"
    assert r.nominal_bits == 8
    assert r.kld.tokens == 2 * 255
    assert 0 <= r.kld.kld_mean < 0.01 and r.kld.same_top_rate > 0.9
    assert r.size_quantized.linear_bits_per_weight == pytest.approx(8.5)  # Q8_0: 34 bytes per 32 weights
    assert r.size_baseline.linear_bits_per_weight == pytest.approx(16.0)
    assert r.size_ratio == pytest.approx((tiny_copy / "tiny-f16.gguf").stat().st_size / q.stat().st_size)
    assert r.size_ratio > 1.2  # the tiny model's file is dominated by its tokenizer metadata, so less than 2x
    assert r.speed_baseline.tg_tokens_per_s > 0 and r.speed_quantized.peak_rss_bytes > 0
    assert {c.name.split(":")[0] for c in r.criteria} == {"perplexity", "speed", "size", "generation", "accuracy"}
    tasks = r.measurements["accuracy"]["tasks"]  # the default spec's benchmark groups, on the same items for both files
    assert set(tasks) | set(r.measurements["accuracy"]["not_measured"]) == {f"{c.name.split(':')[1]}" for c in r.criteria if c.name.startswith("accuracy:")}
    assert all(t["items"] == 10 for t in tasks.values())
    assert "dequantized" not in r.reference_note  # a user checkpoint, not the grid-aligned reference


def test_validate_detects_a_damaged_model(tiny_copy, dataset_dir, tmp_path):
    q = quantize_gguf(tiny_copy / "tiny-f16.gguf", tmp_path / "tiny-q2_k.gguf", "Q2_K")
    r = validate_quantization(ValidationRequest(quantized=str(q), baseline=str(tiny_copy), dataset_dir=str(dataset_dir),
                                                chunks=2, measure_speed=False, check_generation=False))
    q8 = quantize_gguf(tiny_copy / "tiny-f16.gguf", tmp_path / "tiny-q8_0.gguf", "Q8_0")
    r8 = validate_quantization(ValidationRequest(quantized=str(q8), baseline=str(tiny_copy), dataset_dir=str(dataset_dir),
                                                 chunks=2, measure_speed=False, check_generation=False))
    assert r.kld.kld_mean > 5 * r8.kld.kld_mean
    speed = next(c for c in r.criteria if c.name == "speed")
    assert not speed.passed and not r.passed  # not measured is never a pass


def test_evaluate_reports_both_runtimes(tiny_prepared, dataset_dir):
    r = evaluate_model(EvaluateRequest(model=str(tiny_prepared), dataset_dir=str(dataset_dir), chunks=1, measure_speed=False))
    assert [p.model.runtime for p in r.perplexity] == ["transformers", "llama.cpp"]
    assert r.size.bits_per_weight == pytest.approx(32.0)
    assert r.generation is not None and len(r.generation.samples) == 8


def test_compare_outputs_side_by_side(tiny_prepared, tmp_path):
    q = quantize_gguf(tiny_prepared / "tiny-f16.gguf", tmp_path / "tiny-q8_0.gguf", "Q8_0")
    r = compare_outputs(CompareRequest(model_a=str(tiny_prepared), model_b=str(q), prompts=["Hello there", "One two"], max_new_tokens=8))
    assert len(r.rows) == 2
    assert r.model_a.format == "gguf:F16" and r.model_b.format == "gguf:Q8_0"
    assert r.markdown.count("\n") == 4 and "Hello there" in r.markdown
    assert all(row.output_a for row in r.rows)
    same = compare_outputs(CompareRequest(model_a=str(tiny_prepared), model_b=str(tiny_prepared), prompts=["Hello there"], max_new_tokens=8))
    assert same.identical_rate == 1.0


def test_greedy_generation_agrees_across_runtimes(tiny_prepared):
    m = resolve_model(tiny_prepared)
    hf, cpp = TransformersRunner(tiny_prepared), LlamaCppRunner(m.gguf)
    prompt = hf.tokenize("The capital of France is")
    a, b = hf.generate_greedy(prompt, 6), cpp.generate_greedy(prompt, 6)
    assert len(a) == len(b) == 6
    assert a[0] == b[0]
    logits = hf.logits(prompt + a)
    assert int(np.argmax(logits[len(prompt) - 1])) == a[0]


def test_generation_failures_the_float_model_shares_are_not_counted(tiny_prepared, tmp_path):
    """The random tiny model loops and babbles in float already; its Q8_0 copy is not blamed for that."""
    from quantloop.eval.generation import check_generations
    from quantloop.eval.runtimes import LlamaCppRunner
    from quantloop.schemas import quant_spec
    from quantloop.specs import load_quality_spec
    from quantloop.tools.quantize import quantize_model

    settings = load_quality_spec().generation
    f = LlamaCppRunner(next(tiny_prepared.glob("*.gguf")), n_ctx=256)
    q = LlamaCppRunner(quantize_model(tiny_prepared, tmp_path / "q8", quant_spec(method="gguf", gguf_type="Q8_0")).model_path, n_ctx=256)
    own = check_generations(f, f, settings)
    judged = check_generations(q, f, settings)
    assert own.failures > 0  # the float model's own report keeps its failures
    assert any(s.float_failures for s in judged.samples)
    for s in judged.samples:
        kinds = {x.split()[0] for x in s.float_failures}
        assert not any(x.split()[0] in kinds for x in s.failures)
    assert judged.failures == sum(1 for s in judged.samples if s.failures) < own.failures + 1


def test_a_loop_the_float_model_nearly_shows_is_its_own(tiny_prepared):
    """The float model's continuation is held to the loop threshold less float_loop_margin: a float continuation that
    repeats 59 % of its 4-grams (under the 60 % threshold) makes a 69 % loop of the quantized model the float model's."""
    from quantloop.eval.generation import _failures, float_settings, repeated_ngram_rate
    from quantloop.eval.runtimes import LlamaCppRunner
    from quantloop.specs import load_quality_spec

    settings = load_quality_spec().generation
    f = LlamaCppRunner(next(tiny_prepared.glob("*.gguf")), n_ctx=256)
    prompt = f.tokenize("The sun rises")
    loop = [11, 12, 13, 14, 15] * 6 + list(range(20, 30))  # 40 tokens, 37 4-grams of which 22 repeat: 59 %
    rate = repeated_ngram_rate(loop, settings.ngram)
    assert settings.max_repeated_ngram_rate - settings.float_loop_margin < rate < settings.max_repeated_ngram_rate
    assert not any(x.startswith("repetition") for x in _failures(loop, "x", prompt, f, settings)[0])
    assert any(x.startswith("repetition") for x in _failures(loop, "x", prompt, f, float_settings(settings))[0])
    none = list(range(20, 60))
    assert not any(x.startswith("repetition") for x in _failures(none, "x", prompt, f, float_settings(settings))[0])


def test_a_loop_is_the_float_models_only_when_it_is_the_same_loop():
    """A loop is excused only when at least same_loop_share of its repeated 4-grams occur in the float continuation:
    the float model's loop continued a little longer passes, a loop of other tokens on the same prompt does not."""
    from quantloop.eval.generation import same_loop
    from quantloop.specs import load_quality_spec

    settings = load_quality_spec().generation
    ref = [1, 2, 3, 4, 5] * 5 + list(range(40, 55))
    longer = [1, 2, 3, 4, 5] * 8 + [9]
    other = [7, 8, 9, 10] * 10
    half = [1, 2, 3, 4, 5] * 4 + [7, 8, 9, 10] * 5
    assert same_loop(longer, ref, settings)
    assert not same_loop(other, ref, settings)
    assert not same_loop(list(range(100, 140)), ref, settings)  # no loop at all: nothing to excuse
    strict = settings.model_copy(update={"same_loop_share": 0.9})
    assert same_loop(half, ref, settings) and not same_loop(half, ref, strict)


def test_size_bar_denominator_is_the_f16_file_on_both_runtimes(tiny_copy, tiny_prepared, dataset_dir, tmp_path):
    """A float32 transformers copy is twice the F16 file: it is judged 0.5x, not 1x, as it would be on llama.cpp."""
    import shutil

    hf_only = tmp_path / "hf-only"
    shutil.copytree(tiny_copy, hf_only, ignore=shutil.ignore_patterns("*.gguf", "quantloop_model.json"))
    r = validate_quantization(ValidationRequest(quantized=str(hf_only), baseline=str(tiny_prepared), dataset_dir=str(dataset_dir),
                                                chunks=1, nominal_bits=16, measure_speed=False, check_generation=False))
    assert r.runtime == "transformers"
    f16 = (tiny_prepared / "tiny-f16.gguf").stat().st_size
    assert r.size_ratio == pytest.approx(f16 / r.size_quantized.bytes_on_disk) and 0.4 < r.size_ratio < 0.6


def test_a_precision_map_is_judged_by_its_measured_bits(tiny_copy, dataset_dir, tmp_path):
    from quantloop.eval.size import gguf_size, nominal_bits
    from quantloop.schemas import quant_spec
    from quantloop.tools.quantize import quantize_model

    mixed = quantize_model(tiny_copy, tmp_path / "mix", quant_spec(method="gguf", layer_types={"attention": "Q8_0", "feed_forward": "Q4_0"}))
    size = gguf_size(mixed.model_path)
    assert set(size.linear_tensor_types) == {"Q8_0", "Q4_0"} and 5 < size.linear_bits_per_weight < 7
    r = validate_quantization(ValidationRequest(quantized=mixed.model_path, baseline=str(tiny_copy), dataset_dir=str(dataset_dir),
                                                chunks=1, measure_speed=False, check_generation=False))
    assert r.nominal_bits == int(size.linear_bits_per_weight)  # not the 8 bits of the file's base type
    q4km = quantize_gguf(tiny_copy / "tiny-f16.gguf", tmp_path / "tiny-q4_k_m.gguf", "Q4_K_M")
    assert nominal_bits(gguf_size(q4km), "Q4_K_M") == 4  # llama.cpp's named mixtures keep their name's width


def test_a_model_no_faster_than_its_baseline_fails_the_speed_bar(tiny_copy, dataset_dir, tmp_path):
    import shutil

    same = tmp_path / "same-f16.gguf"
    shutil.copyfile(tiny_copy / "tiny-f16.gguf", same)
    r = validate_quantization(ValidationRequest(quantized=str(same), baseline=str(tiny_copy), dataset_dir=str(dataset_dir),
                                                spec_file=validation_spec(tmp_path / "s.yaml", threads=3), nominal_bits=16, check_generation=False))
    # both sides ran with the spec's thread count, as llama-bench itself reports it (not QUANTLOOP_THREADS or the cores)
    assert r.speed_baseline.threads == r.speed_quantized.threads == 3
    speed = next(c for c in r.criteria if c.name == "speed")
    assert len(r.speedup_tg_pairs) == 3 and r.speedup_tg == pytest.approx(float(np.median(r.speedup_tg_pairs)))
    assert 0.6 < r.speedup_tg < 1.4 and not speed.passed and not r.passed
    assert speed.margin_sigmas < 0 and "fails by" in speed.detail and "interleaved pairs" in speed.detail


def test_a_perplexity_increase_within_its_noise_of_the_bar_is_measured_again(tiny_copy, dataset_dir, tmp_path):
    q = quantize_gguf(tiny_copy / "tiny-f16.gguf", tmp_path / "tiny-q4_0.gguf", "Q4_0")
    first = validate_quantization(ValidationRequest(quantized=str(q), baseline=str(tiny_copy), dataset_dir=str(dataset_dir),
                                                    spec_file=validation_spec(tmp_path / "a.yaml"), measure_speed=False, check_generation=False))
    assert first.kld.tokens == 2 * 31  # 2 chunks of 64, each scoring its second half
    bar = first.kld.ppl_increase_pct  # a bar exactly at the measured value: within the noise by construction
    again = validate_quantization(ValidationRequest(quantized=str(q), baseline=str(tiny_copy), dataset_dir=str(dataset_dir),
                                                    spec_file=validation_spec(tmp_path / "b.yaml", max_ppl=bar, max_chunks=8),
                                                    measure_speed=False, check_generation=False))
    assert again.kld.tokens in (4 * 31, 8 * 31)  # doubled (twice at most: max_chunks 8) before the verdict
    ppl = next(c for c in again.criteria if c.name == "perplexity")
    assert ppl.margin_sigmas is not None and "sigma" in ppl.detail


def test_a_bar_met_only_within_the_noise_is_not_shown_and_fails(tiny_copy, dataset_dir, tmp_path):
    """Below the bar by one standard error fails ("not shown"); by five, passes: the same file, the same chunks."""
    q = quantize_gguf(tiny_copy / "tiny-f16.gguf", tmp_path / "tiny-q4_0.gguf", "Q4_0")

    def ppl_criterion(max_ppl, name):
        r = validate_quantization(ValidationRequest(quantized=str(q), baseline=str(tiny_copy), dataset_dir=str(dataset_dir),
                                                    spec_file=validation_spec(tmp_path / name, max_ppl=max_ppl), measure_speed=False,
                                                    check_generation=False))
        return r.kld, next(c for c in r.criteria if c.name == "perplexity")

    kld, _ = ppl_criterion(1000.0, "a.yaml")
    se = 100 * kld.ppl_ratio * kld.ln_ppl_ratio_stderr
    assert se > 0
    _, near = ppl_criterion(kld.ppl_increase_pct + se, "b.yaml")
    assert not near.passed and 0.9 < near.margin_sigmas < 1.1 and "not shown" in near.detail
    _, clear = ppl_criterion(kld.ppl_increase_pct + 5 * se, "c.yaml")
    assert clear.passed and clear.margin_sigmas > 4.9 and "not shown" not in clear.detail
