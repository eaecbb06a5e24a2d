"""Measured step costs (agents/step_costs.py) and the sensitivity cache: both kept per model weights, so a changed
model is measured afresh; the QAT step's time limit keeps the measured minutes of what must fit after it when they
are known, and the policy's reserve_minutes when they are not."""

import json
import shutil

import pytest

from quantloop.agents.policy import load_policy
from quantloop.agents.state import PipelineState, PlannedAttempt
from quantloop.agents.step_costs import (
    cost_of,
    expected_minutes,
    model_digest,
    read_costs,
    record_cost,
    step_key,
    tail_seconds,
    training_limit,
)
from quantloop.schemas import CalibrationSpec, quant_spec
from quantloop.search.schemas import SensitivityRequest, TextSpec


def change_weights(model_dir):
    """The same checkpoint folder with every weight a little changed, as a fine-tune changes them (another model)."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    save_file({n: t + 0.01 for n, t in load_file(path).items()}, path, metadata={"format": "pt"})


def plan_of(checkpoint, tmp_path) -> list[PlannedAttempt]:
    """The default policy's first steps on one checkpoint: QAT, AWQ (the policy skips it), Q8_0."""
    qat = quant_spec(method="qat", gguf_type="IQ4_NL", qat_init="gptq", calibration=CalibrationSpec(samples=8, seqlen=32))
    return [PlannedAttempt(index=0, step="int4-qat-iq4nl", kind="qat", spec=qat, checkpoint=str(checkpoint),
                           output_dir=str(tmp_path / "0"), expect_minutes=20),
            PlannedAttempt(index=1, step="int4-awq", kind="quantize", spec=quant_spec(method="awq", bits=4, gguf_type="Q4_1",
                           group_size=32, symmetric=False), checkpoint=str(checkpoint), output_dir=str(tmp_path / "1"),
                           skip="AWQ does not run on this target"),
            PlannedAttempt(index=2, step="int8-gguf-q8_0", kind="quantize", spec=quant_spec(method="gguf", gguf_type="Q8_0"),
                           checkpoint=str(checkpoint), output_dir=str(tmp_path / "2"), expect_minutes=4)]


def state_of(checkpoint, tmp_path, spent_minutes: float = 2.0) -> PipelineState:
    policy, _ = load_policy()
    policy = policy.model_copy(update={"max_minutes": 40.0, "reserve_minutes": 14.0, "cost_margin": 1.25})
    return PipelineState(run_id="now", model=str(checkpoint), target="cpu", policy=policy, acceptance_spec="a.yaml",
                         acceptance_sha256="abc", dataset_dir=str(tmp_path), output_root=str(tmp_path),
                         plan=plan_of(checkpoint, tmp_path), active_s=60 * spent_minutes)


def test_a_step_cost_is_kept_once_per_model_and_a_changed_model_is_measured_afresh(tiny_copy, tmp_path):
    state = state_of(tiny_copy, tmp_path)
    q8 = state.plan[2]
    digest = model_digest(str(tiny_copy))
    record_cost(digest, step_key(q8, state), q8.step, "r1", quantize_s=12.0)
    record_cost(digest, step_key(q8, state), q8.step, "r2", quantize_s=99.0, validate_s=198.0)  # only the new part is kept
    cost = cost_of(q8, state)
    assert (cost.quantize_s, cost.quantize_run, cost.validate_s, cost.validate_run) == (12.0, "r1", 198.0, "r2")
    assert expected_minutes(q8, state).minutes == pytest.approx(3.5)
    assert expected_minutes(q8, state).source == "measured in runs r1 and r2"
    # another spec under the same step name is another step; a step never measured keeps the policy's estimate
    other = q8.model_copy(update={"spec": quant_spec(method="gguf", gguf_type="Q6_K")})
    assert cost_of(other, state) is None
    qat = expected_minutes(state.plan[0], state)
    assert (qat.minutes, qat.source) == (20, "policy estimate")
    # the same folder with other weights: nothing measured on it, the policy's estimate again
    change_weights(tiny_copy)
    assert model_digest(str(tiny_copy)) != digest and cost_of(q8, state) is None
    assert expected_minutes(q8, state).source == "policy estimate"
    assert list(read_costs(digest)) == [step_key(q8, state)]  # the first model's record is untouched


def test_the_qat_limit_keeps_measured_minutes_when_known_and_the_policy_reserve_otherwise(tiny_copy, tmp_path):
    state = state_of(tiny_copy, tmp_path)
    qat, q8 = state.plan[0], state.plan[2]
    spec = qat.spec.model_copy(update={"qat_max_minutes": None})
    limited, line = training_limit(spec, state, qat)
    assert limited.qat_max_minutes == pytest.approx(40 - 2 - 14) and "policy estimate: reserve_minutes 14" in line

    digest = model_digest(str(tiny_copy))
    record_cost(digest, step_key(qat, state), qat.step, "r1", quantize_s=700.0, tail_s=30.0, validate_s=210.0)
    limited, line = training_limit(spec, state, qat)  # the next step that runs (Q8_0) is not measured yet
    assert limited.qat_max_minutes == pytest.approx(24.0) and "policy estimate" in line

    record_cost(digest, step_key(q8, state), q8.step, "r1", quantize_s=12.0, validate_s=198.0)
    limited, line = training_limit(spec, state, qat)
    reserve = 1.25 * (30 + 210 + 12 + 198) / 60  # its export and validation, then Q8_0 (AWQ is skipped by the policy)
    assert limited.qat_max_minutes == pytest.approx(40 - 2 - reserve)
    assert "measured in run r1" in line and "int8-gguf-q8_0" in line and "policy estimate" not in line

    # qat_max_minutes stays a cap: the saved minutes go to QAT only when the step leaves it unset
    capped, line = training_limit(spec.with_time_limit(13.0), state, qat)
    assert capped.qat_max_minutes == pytest.approx(13.0) and "capped by its qat_max_minutes 13" in line
    # late in the run the reserve decides, whatever the cap
    late = state.model_copy(update={"active_s": 30 * 60.0})
    assert training_limit(spec.with_time_limit(13.0), late, qat)[0].qat_max_minutes == pytest.approx(10 - reserve)
    # another model (changed weights): its costs are unknown, the policy's reserve again
    change_weights(tiny_copy)
    assert training_limit(spec, state, qat)[0].qat_max_minutes == pytest.approx(24.0)


def test_the_seconds_after_training_count_from_the_deadline_or_the_end_of_training(tmp_path):
    (tmp_path / "qat_result.json").write_text(json.dumps({"trained_unix": 1065.0}))
    assert tail_seconds(tmp_path, 1000.0, 1080.0, 1.0) == pytest.approx(20.0)  # stopped by its 1-minute limit
    assert tail_seconds(tmp_path, 1000.0, 1080.0, 5.0) == pytest.approx(15.0)  # finished before the limit
    assert tail_seconds(tmp_path, 1000.0, 1080.0, None) == pytest.approx(15.0)
    assert tail_seconds(tmp_path / "none", 1000.0, 1080.0, 1.0) is None


def test_the_agent_records_a_real_quantization_and_not_a_reused_one(tiny_copy, tmp_path):
    from quantloop.agents.quantization import QuantizationAgent

    state = state_of(tiny_copy, tmp_path).model_copy(update={"next_index": 2})
    q8 = state.plan[2]
    update = QuantizationAgent()(state)
    attempt = update["attempts"][-1]
    assert attempt.status == "quantized" and attempt.quantize_s > 0
    cost = cost_of(q8, state)
    assert cost.quantize_s == pytest.approx(attempt.quantize_s, abs=0.01) and cost.quantize_run == "now"
    assert cost.validate_s is None and expected_minutes(q8, state).source == "policy estimate"  # not validated yet
    # the same step in another run reuses the cached files: nothing quantized, nothing recorded
    again = state.model_copy(update={"run_id": "later"})
    reused = QuantizationAgent()(again)["attempts"][-1]
    assert any("reused the files" in n for n in reused.quantization.notes)
    assert cost_of(q8, state).quantize_run == "now"


def sensitivity_request(model, dataset, cache) -> SensitivityRequest:
    text = [TextSpec(dataset_dir=str(dataset), split="calibration", chunks=1, seqlen=32)]
    return SensitivityRequest(model=str(model), text=text, types=["Q4_0"], granularity="tensor", cache_dir=str(cache),
                              units=["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"])


def test_sensitivity_is_reused_for_the_same_weights_and_text_and_measured_afresh_for_changed_ones(tiny_copy, dataset_dir,
                                                                                                    tmp_path):
    from quantloop.tools.sensitivity import measure_sensitivity

    cache = tmp_path / "cache"
    first = measure_sensitivity(sensitivity_request(tiny_copy, dataset_dir, cache))
    assert first.measured == 2
    again = measure_sensitivity(sensitivity_request(tiny_copy, dataset_dir, cache))
    assert again.measured == 0 and again.key == first.key and [r.kld for r in again.rows] == [r.kld for r in first.rows]
    # the same text in another folder (another checkout, another SLM folder): the same rows
    moved = tmp_path / "elsewhere" / dataset_dir.name
    shutil.copytree(dataset_dir, moved)
    assert measure_sensitivity(sensitivity_request(tiny_copy, moved, cache)).measured == 0
    saved = json.loads(open(first.cache_file).read())
    assert "llama_cpp_python" in saved["versions"] and "gguf" in saved["versions"]
    # other weights in the same folder: another key, every row measured again
    change_weights(tiny_copy)
    changed = measure_sensitivity(sensitivity_request(tiny_copy, dataset_dir, cache))
    assert changed.key != first.key and changed.measured == 2
