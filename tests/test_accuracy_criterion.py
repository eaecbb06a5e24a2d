"""The accuracy criterion end to end on the tiny model: validate_quantization scores the installed benchmarks on
llama.cpp for the float and the quantized file (the same items), keeps the measurement in validation_report.json,
judges accuracy:<task> (a task the random tiny model cannot beat chance on is reported, not binding), and the quality
rule decides which bars carried the verdict; a missing benchmark is one line and exit 2 before anything is measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantloop.benchmarks.install import verify_installed
from quantloop.eval.criteria.accuracy import Accuracy
from quantloop.backends.gguf import quantize_gguf
from quantloop.schemas import ValidationRequest
from quantloop.tools.validate import validate_quantization

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["copa", "os_man"]


def installed() -> None:
    try:
        for t in TASKS:
            verify_installed(t)
    except Exception as e:  # noqa: BLE001 (any reason the benchmark cannot be read)
        pytest.skip(f"benchmarks not installed ({e}): run `make benchmarks`")


def accuracy_spec(path: Path, quality: str = "either", max_ppl: float = 2.0) -> Path:
    path.write_text(yaml.safe_dump({
        "acceptance": {"max_ppl_increase_pct": max_ppl, "min_speedup": 1e-6, "min_size_ratio": {4: 1.0, 8: 1.0},
                       "no_generation_failures": False, "quality": quality,
                       "accuracy": {"tasks": TASKS, "items": 12, "max_items": 12, "max_drop_pp": 2.0}},
        "eval": {"context": 64, "chunks": 2},
        "speed": {"prompt_tokens": 8, "gen_tokens": 4, "repeats": 1},
        "generation": {"prompts": ["Hello"], "max_new_tokens": 4, "min_new_tokens": 1},
    }))
    return path


def test_validation_scores_the_benchmarks_on_the_same_items_and_the_rule_names_what_carried(tiny_copy, dataset_dir, tmp_path):
    installed()
    q8 = quantize_gguf(tiny_copy / "tiny-f16.gguf", tmp_path / "tiny-q8_0.gguf", "Q8_0")
    r = validate_quantization(ValidationRequest(quantized=str(q8), baseline=str(tiny_copy), dataset_dir=str(dataset_dir),
                                                spec_file=str(accuracy_spec(tmp_path / "a.yaml")),
                                                check_generation=False, report_path=str(tmp_path / "report.json")))
    acc = r.measurements["accuracy"]
    assert set(acc["tasks"]) == set(TASKS) and not acc["not_measured"]
    for task, t in acc["tasks"].items():
        assert t["items"] == 12 and 0 <= t["base_acc"] <= 1 and 0 <= t["quant_acc"] <= 1
        assert t["drop_pp"] == pytest.approx(100 * (t["base_acc"] - t["quant_acc"]))  # paired: the same 12 items
    results = {c.name: c for c in r.criteria}
    assert {"accuracy:copa", "accuracy:os_man"} <= set(results)
    for task in TASKS:  # a random 2-layer model is at chance: its accuracy says nothing and binds nothing
        assert results[f"accuracy:{task}"].binding is acc["tasks"][task]["above_chance"]
    assert not any(acc["tasks"][t]["above_chance"] for t in TASKS)
    ppl_ok = results["perplexity"].passed
    assert ppl_ok and results["size"].passed and results["speed"].passed  # Q8_0 of the tiny model, a 1e-6x speed bar
    assert r.passed and r.carried_by == ["perplexity"]  # either rule: perplexity held, accuracy bound nothing
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["measurements"]["accuracy"]["tasks"]["copa"]["items"] == 12
    assert [c.get("binding") for c in on_disk["criteria"] if c["name"].startswith("accuracy")] == [False, False]

    # the rule 'accuracy' cannot be carried by tasks that bind nothing: rejected whatever perplexity says
    strict = validate_quantization(ValidationRequest(quantized=str(q8), baseline=str(tiny_copy), dataset_dir=str(dataset_dir),
                                                     spec_file=str(accuracy_spec(tmp_path / "b.yaml", quality="accuracy")),
                                                     check_generation=False, report_path=str(tmp_path / "b.json")))
    assert not strict.passed and strict.carried_by == [] and all(c.passed for c in strict.criteria if c.name in ("perplexity", "size"))
    speed = next(c for c in strict.criteria if c.name == "speed")  # it could not change the verdict: not measured
    assert speed.measured is None and not speed.binding and "the quality rule (accuracy): no bar it needs can hold" in speed.detail
    assert strict.measurements["accuracy"] == {**acc, "seconds": strict.measurements["accuracy"]["seconds"],
                                               "tasks": {k: {**v, "seconds": strict.measurements["accuracy"]["tasks"][k]["seconds"]}
                                                         for k, v in acc["tasks"].items()}}  # the same items, the same answers


def test_the_accuracy_columns_and_summary_fields_come_from_the_flattened_report(tiny_copy, dataset_dir, tmp_path):
    installed()
    from quantloop.agents.quantization import flatten_numbers
    from quantloop.schemas import ValidationReport

    q4 = quantize_gguf(tiny_copy / "tiny-f16.gguf", tmp_path / "tiny-q4_0.gguf", "Q4_0")
    r = validate_quantization(ValidationRequest(quantized=str(q4), baseline=str(tiny_copy), dataset_dir=str(dataset_dir),
                                                spec_file=str(accuracy_spec(tmp_path / "a.yaml")), measure_speed=False,
                                                check_generation=False, report_path=str(tmp_path / "r.json")))
    metrics = flatten_numbers(ValidationReport.model_validate(r.model_dump()).model_dump(mode="json"))
    c = Accuracy()
    summary = c.summary(metrics)
    assert set(summary) >= {"accuracy_drop_pp.copa", "accuracy_drop_pp.os_man"}
    assert summary["accuracy_drop_pp.copa"] == pytest.approx(r.measurements["accuracy"]["tasks"]["copa"]["drop_pp"])
    assert summary["accuracy_drop_pp"] is None  # no task beats chance: no mean drop to show
    section = c.section([("0: int4", metrics)])
    assert section.headers == ["attempt", "copa", "os_man"] and section.rows[0][0] == "float baseline"
    assert section.rows[1][0] == "0: int4" and "%" in section.rows[1][1]


def test_a_missing_benchmark_is_one_line_and_exit_2_before_any_measurement(tiny_copy, dataset_dir, tmp_path):
    slm = tmp_path / "SLM"
    (slm / "benchmarks").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "QUANTLOOP_SLM_DIR"} | {"QUANTLOOP_SLM_DIR": str(slm)}
    out = subprocess.run([sys.executable, "-m", "quantloop.pipelines.cli", "validate", str(tiny_copy / "tiny-f16.gguf"),
                          "--base", str(tiny_copy), "--dataset", str(dataset_dir), "--spec", str(accuracy_spec(tmp_path / "a.yaml")),
                          "--no-speed"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "copa" in lines[0] and "quantloop prepare --benchmarks" in lines[0], out.stderr
    assert not (tmp_path / "validation_report.json").exists() and not list(tiny_copy.glob("validation_report.json"))


def test_the_evaluation_agent_can_rank_checkpoints_by_benchmark_accuracy(tiny_prepared, reference_dir, dataset_dir, tmp_path):
    installed()
    from conftest import build_tiny_llama
    from quantloop.agents.evaluation import EvaluationAgent
    from quantloop.agents.policy import load_policy
    from quantloop.agents.state import PipelineState
    from quantloop.benchmarks.score import evaluate_tasks
    from quantloop.benchmarks.tasks import task_configs
    from quantloop.models.checkpoints import prepare_model

    folder = tmp_path / "checkpoints"
    prepare_model(build_tiny_llama(tmp_path / "raw1", reference_dir, seed=1), "step_100", folder)
    prepare_model(build_tiny_llama(tmp_path / "raw2", reference_dir, seed=2), "step_200", folder)
    (tmp_path / "acceptance.yaml").write_text(accuracy_spec(tmp_path / "a.yaml").read_text())
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({
        "target": "cpu", "acceptance_spec": "acceptance.yaml",
        "validation": {"chunks": 2, "measure_speed": False, "selection_chunks": 1, "rank_by": "accuracy",
                       "rank_tasks": ["copa"], "rank_items": 30},
        "steps": {"cpu": [{"name": "int8-q8_0", "spec": {"method": "gguf", "bits": 8, "gguf_type": "Q8_0"}}]}}))
    policy, spec = load_policy(tmp_path / "policy.yaml")
    state = PipelineState(run_id="x", model=str(folder), target="cpu", policy=policy, acceptance_spec=str(spec),
                          dataset_dir=str(dataset_dir), output_root=str(tmp_path / "q"))
    ranked = EvaluationAgent()(state)["candidates"]
    accuracies = [c.accuracy for c in ranked]
    assert all(a is not None for a in accuracies) and accuracies == sorted(accuracies, reverse=True)
    for c in ranked:  # the mean over rank_tasks of copa's acc, on the last 30 items of its order
        tail = evaluate_tasks(Path(c.path) / f"{Path(c.path).name}-f16.gguf", task_configs(["copa"]), limit=30, from_end=True)["copa"]
        assert c.accuracy == pytest.approx(tail.acc)
    head = evaluate_tasks(Path(ranked[0].path) / f"{Path(ranked[0].path).name}-f16.gguf", task_configs(["copa"]), limit=12)["copa"]
    assert not set(head.doc_ids) & set(tail.doc_ids)  # checkpoint selection never scores the acceptance bar's items
