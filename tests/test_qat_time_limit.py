"""A QAT step that trains for the time it is given: the plan of steps shrinks to a deadline (backends/qat/schedule.py), the
trainer stops on time with its global fine-tune, and the agent gives a QAT step what is left of the run's budget."""

import json
import time

import pytest

from quantloop.agents.policy import load_policy
from quantloop.agents.quantization import with_run_time_limit
from quantloop.agents.state import PipelineState
from quantloop.backends.qat.backend import QATConfig
from quantloop.backends.qat.schedule import StepPlan, fit_counts
from quantloop.errors import InputError
from quantloop.schemas import CalibrationSpec, quant_spec


def test_fit_counts_keeps_each_share_and_the_order():
    assert fit_counts([12, 12, 12, 24], 100) == [12, 12, 12, 24]  # fits: unchanged
    cut = fit_counts([12, 12, 12, 24], 30)
    assert sum(cut) == 30 and cut[3] == 12 and all(c <= o for c, o in zip(cut, [12, 12, 12, 24]))
    assert fit_counts([3, 0, 5], 0) == [0, 0, 0]
    assert sum(fit_counts([7, 5, 1], 6)) == 6


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_step_plan_ends_by_the_deadline_and_keeps_the_global_fine_tune():
    """Steps of 1 s against a deadline 30 s away: 30 steps, every stage and the fine-tune keep their share."""
    clock = FakeClock()
    plan = StepPlan([20, 20, 20, 40], deadline=30.0, clock=clock)
    plan.begin()
    for stage in range(4):
        while plan.left(stage) > 0:
            clock.now += 1.0
            plan.step_done(stage)
    assert clock.now <= 30.0 and sum(plan.taken) >= 28, (clock.now, plan.taken)
    assert plan.shrunk and plan.taken[3] >= 10 and all(t > 0 for t in plan.taken), plan.taken
    assert plan.total == sum(plan.taken)


def test_step_plan_without_a_deadline_takes_every_step_and_a_stage_can_stop_early():
    plan = StepPlan([5, 5, 10])
    plan.begin()
    for _ in range(2):
        plan.step_done(0)
    plan.stop_stage(0)
    assert plan.left(0) == 0 and plan.left(1) == 5 and plan.total == 17 and not plan.shrunk


def test_step_plan_past_its_deadline_takes_no_step():
    clock = FakeClock()
    clock.now = 50.0
    plan = StepPlan([5, 5], deadline=40.0, clock=clock)
    plan.begin()
    assert plan.total == 0 and plan.shrunk


def test_qat_stops_at_its_time_limit_with_a_global_fine_tune(tiny_prepared, tmp_path):
    """1000 planned steps on the tiny model with an 8 s limit (room for its set-up on a busy machine): far fewer steps, the result says the limit cut
    them, the global fine-tune ran, and the call returns soon after the limit."""
    from quantloop.backends.qat.backend import qat_checkpoint
    from quantloop.data.synthetic import generate_synthetic
    from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer

    teacher = load_hf_model(tiny_prepared)
    seqs = generate_synthetic(teacher, load_hf_tokenizer(tiny_prepared), 12, 24, seed=0, batch_size=12, progress=False)
    del teacher
    t0 = time.perf_counter()
    qat_checkpoint(tiny_prepared, tmp_path / "qat", "Q4_0", seqs, steps=1000, seed=0,
                   config=QATConfig(batch_size=4, groups=2, progress=False, device="cpu", max_s=8.0))
    wall = time.perf_counter() - t0
    res = json.loads((tmp_path / "qat" / "qat_result.json").read_text())
    assert res["time_limited"] and res["planned_steps"] == 1000 and 0 < res["steps"] < 1000, res["steps"]
    assert res["stages"][-1]["stage"] == "global" and res["stages"][-1]["steps"] > 0
    assert res["wall_s"] < 8.0 + 4.0, res["wall_s"]  # the limit, one step and the final held-out KL
    assert wall < 60  # loading and export on top


def test_a_bad_time_limit_is_an_input_error():
    from quantloop.backends.qat.train import _check

    with pytest.raises(InputError, match="time limit"):
        _check(QATConfig(max_s=0))
    with pytest.raises(ValueError):
        quant_spec(method="qat", gguf_type="Q4_0", qat_max_minutes=-1)


def test_the_agent_gives_a_qat_step_what_is_left_of_the_run(tmp_path):
    policy, _ = load_policy()
    policy = policy.model_copy(update={"max_minutes": 30.0, "reserve_minutes": 8.0})
    state = PipelineState(run_id="x", model=str(tmp_path), target="cpu", policy=policy, acceptance_spec="a.yaml",
                          dataset_dir=str(tmp_path), output_root=str(tmp_path), active_s=12 * 60)
    qat = quant_spec(method="qat", gguf_type="IQ4_NL", calibration=CalibrationSpec(samples=8, seqlen=32))
    assert with_run_time_limit(qat, state).qat_max_minutes == pytest.approx(10.0)  # 30 - 12 - 8
    own = qat.model_copy(update={"qat_max_minutes": 4.0})
    assert with_run_time_limit(own, state).qat_max_minutes == pytest.approx(4.0)
    gptq = quant_spec(method="gptq", gguf_type="IQ4_NL", act_order=True)
    assert with_run_time_limit(gptq, state) == gptq
    unbounded = state.model_copy(update={"policy": policy.model_copy(update={"max_minutes": None})})
    assert with_run_time_limit(qat, unbounded).qat_max_minutes is None
    assert qat.model_copy(update={"qat_max_minutes": 10.0}).tag().startswith("qat-iq4_nl-s200-m10")


def test_a_step_expected_to_end_past_the_run_budget_is_not_started(tmp_path):
    from quantloop.agents.quantization import QuantizationAgent
    from quantloop.agents.state import PlannedAttempt

    policy, _ = load_policy()
    policy = policy.model_copy(update={"max_minutes": 30.0})
    state = PipelineState(run_id="x", model=str(tmp_path), target="cpu", policy=policy, acceptance_spec="a.yaml",
                          dataset_dir=str(tmp_path), output_root=str(tmp_path), active_s=20 * 60)
    spec = quant_spec(method="gguf", gguf_type="Q8_0")
    planned = PlannedAttempt(index=0, step="long", kind="quantize", spec=spec, checkpoint=str(tmp_path / "none"),
                             output_dir=str(tmp_path / "out"), expect_minutes=16)
    attempt = QuantizationAgent().attempt(planned, state)
    assert attempt.status == "skipped" and "about 16 min" in attempt.note and "20.0 of its 30 min" in attempt.note
    assert not (tmp_path / "out").exists()


def test_the_time_limit_counts_from_the_start_of_the_step():
    """What quantize_model spent before the trainer (the size budget's sensitivity, the calibration text) is paid
    from the QAT time limit; other methods are untouched."""
    from quantloop.tools.quantize import time_left_for_training

    qat = quant_spec(method="qat", gguf_type="IQ4_NL", qat_max_minutes=10.0)
    left = time_left_for_training(qat, time.perf_counter() - 120).qat_max_minutes
    assert 7.9 < left < 8.01, left
    assert time_left_for_training(qat, time.perf_counter() - 3600).qat_max_minutes == pytest.approx(0.05)
    gptq = quant_spec(method="gptq", gguf_type="IQ4_NL", act_order=True)
    assert time_left_for_training(gptq, time.perf_counter() - 120) == gptq


def test_qat_that_ends_worse_than_it_started_keeps_its_starting_weights(tiny_prepared):
    """A learning rate far too large wrecks the student in a few steps: the trainer returns its starting weights
    (their held-out KL, not the wrecked one) and says so; a learning rate of 0 changes nothing and keeps nothing."""
    from quantloop.backends.qat.train import run_qat
    from quantloop.data.synthetic import generate_synthetic
    from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer

    teacher = load_hf_model(tiny_prepared)
    seqs = generate_synthetic(teacher, load_hf_tokenizer(tiny_prepared), 12, 24, seed=0, batch_size=12, progress=False)
    base = dict(gguf_type="Q4_0", steps=4, batch_size=4, groups=1, global_fraction=1.0, check_every=0, progress=False,
                device="cpu", learn_scales=False)
    _, wrecked, _ = run_qat(teacher, seqs, QATConfig(lr=50.0, **base))
    assert wrecked.kept_start
    assert wrecked.stages[-1]["end_kl"] > wrecked.rtn_kl  # training really made it worse
    assert wrecked.final_kl == pytest.approx(wrecked.rtn_kl, rel=1e-3)
    _, still, _ = run_qat(teacher, seqs, QATConfig(lr=0.0, **base))
    assert not still.kept_start and still.final_kl == pytest.approx(still.rtn_kl, rel=1e-3)
