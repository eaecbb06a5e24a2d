"""The acceptance criteria are one interface and one registry (quantloop/eval/criteria): a criterion a test registers,
its own class and one register() call, is measured, judged and shown in the attempt line, validation_report.json,
the run report (Markdown and HTML), MLflow (params and metrics) and quantization_summary.json, with no other file
changed; the built-in four keep the files they always wrote."""

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline_helpers import run_tiny, tiny_policy
from quantloop.eval.criteria import base as criteria
from quantloop.eval.criteria.base import Cell, Criterion, fmt, number
from quantloop.pipelines.report_format import format_validation
from quantloop.pipelines.run import headers, print_attempt
from quantloop.schemas import AcceptanceCriteria, CriterionResult, ValidationReport


class FileKiB(BaseModel):
    kib: float


class ToyFileSize(Criterion):
    """The quantized file is under a size in KiB: a measurement of its own, a bar, a column, a summary field, a param."""

    name = "toy"
    tip = "the toy bar fails: pick a smaller file"
    bar_kib = 1e9

    def measure(self, ctx) -> FileKiB:
        return FileKiB(kib=Path(ctx.quantized.gguf).stat().st_size / 1024)

    def judge(self, m, acceptance, sigmas) -> list[CriterionResult]:
        kib = m.own[self.name].kib
        return [CriterionResult(name=self.name, passed=kib < self.bar_kib, measured=kib, threshold=f"< {self.bar_kib:g} KiB",
                                detail=f"{kib:.1f} KiB on disk")]

    def cells(self, metrics, where) -> list[Cell]:
        return [Cell("toy KiB", fmt(number(metrics, "measurements.toy.kib"), "{:.1f}"), label="toy")]

    def summary(self, metrics) -> dict:
        return {"toy_kib": metrics.get("measurements.toy.kib")}

    def params(self, result) -> dict:
        return {"toy.threshold": result.threshold}

    def bar(self, acceptance, where) -> str:
        return f"toy file < {self.bar_kib:g} KiB"


@pytest.fixture
def toy():
    c = criteria.register(ToyFileSize())
    try:
        yield c
    finally:
        criteria.unregister(c)


def test_registry_lists_the_built_in_criteria_in_order_and_a_registered_one_after_them(toy):
    assert [c.name for c in criteria.criteria()] == ["perplexity", "speed", "size", "generation", "accuracy", "toy"]
    assert criteria.criterion_for("perplexity:bible").name == "perplexity" and criteria.criterion_for("toy") is toy
    with pytest.raises(ValueError, match="named 'toy' is registered already"):
        criteria.register(ToyFileSize())
    assert headers() == ["#", "step", "method", "bits", "ppl Δ", "KLD", "speed", "size", "acc drop", "toy KiB", "verdict"]
    assert criteria.bar_text(AcceptanceCriteria(), "line").endswith("no generation failures: True, toy file < 1e+09 KiB")


def test_a_registered_criterion_shows_in_the_attempt_line_report_mlflow_and_summary(toy, tiny_prepared, dataset_dir, tmp_path, capsys):
    from quantloop.report import write_run_report
    from quantloop.tracking import pipeline_run_records

    policy = tiny_policy(tmp_path, [{"name": "int8-q8_0", "spec": {"method": "gguf", "bits": 8, "gguf_type": "Q8_0"}}],
                         measure_speed=False, max_ppl_pct=50.0)
    state = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy, run_id="toy-run", on_attempt=print_attempt)
    a = state.attempts[0]
    kib = Path(a.quantization.model_path).stat().st_size / 1024

    # judged after the built-in criteria, from its own measurement
    assert [c.name for c in a.criteria][-1] == "toy" and a.criteria[-1].passed and a.criteria[-1].measured == pytest.approx(kib)
    report = json.loads(Path(a.report_path).read_text())
    assert report["measurements"] == {"toy": {"kib": pytest.approx(kib)}} and report["criteria"][-1]["name"] == "toy"
    # an earlier run's report (no 'measurements' key) loads, and is written back without one
    earlier = {k: v for k, v in report.items() if k != "measurements"}
    assert json.loads(ValidationReport.model_validate(earlier).model_dump_json()) == earlier
    assert ValidationReport.model_validate(report).measurements == report["measurements"]
    # `quantloop validate`'s table: a row of its own
    assert any(x.startswith("toy ") and "pass" in x and "KiB on disk" in x
               for x in format_validation(ValidationReport.model_validate(report)).splitlines())

    # the attempt line: its word and value between the built-in cells and the verdict
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[0] int8-q8_0"))
    assert f"  size {a.metrics['size_ratio']:.2f}x  acc -  toy {kib:.1f}  -> " in line

    # MLflow: its param, its result and its measurement as metrics
    rec = pipeline_run_records(f"sqlite:///{tmp_path}/mlflow.db", "toy-run")["attempts"][0]
    assert rec["params"]["toy.threshold"] == "< 1e+09 KiB"
    assert rec["metrics"]["criteria.toy.measured"] == pytest.approx(kib) and rec["metrics"]["criteria.toy.passed"] == 1.0
    assert rec["metrics"]["measurements.toy.kib"] == pytest.approx(kib)

    # quantization_summary.json: its field after the built-in ones
    row = json.loads(Path(state.summary_path).read_text())["attempts"][0]
    keys = list(row)
    assert row["toy_kib"] == pytest.approx(kib) and keys.index("size_ratio") < keys.index("toy_kib") < keys.index("bits_per_weight")

    # the run report: a column, its cell, and its bar in words, in Markdown and HTML
    paths = write_run_report("toy-run", f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "report")
    md, html = paths.markdown.read_text(), paths.html.read_text()
    assert "| size | accuracy drop | toy KiB | verdict |" in md and f"| {kib:.1f} |" in md and "toy file < 1e+09 KiB" in md
    assert "<th>toy KiB</th>" in html and f"<td class='num'>{kib:.1f}</td>" in html and "toy file &lt; 1e+09 KiB" in html


class TinyToyFileSize(ToyFileSize):
    bar_kib = 1.0


@pytest.fixture
def tiny_toy():
    c = criteria.register(TinyToyFileSize())
    try:
        yield c
    finally:
        criteria.unregister(c)


def test_a_failing_registered_criterion_is_named_by_the_reviewer(tiny_toy, tiny_prepared, dataset_dir, tmp_path):
    """Its failure is described in the attempt's reason and its tip is the recommendation."""
    policy = tiny_policy(tmp_path, [{"name": "int8-q8_0", "spec": {"method": "gguf", "bits": 8, "gguf_type": "Q8_0"}}],
                         measure_speed=True, max_ppl_pct=50.0)
    state = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy, run_id="toy-fail")
    a = state.attempts[0]
    assert state.decision == "rejected" and [c.name for c in a.criteria if not c.passed and c.binding] == ["toy"]
    # speed comes after the criteria's own measurements: once toy fails it cannot change the verdict, so it is skipped
    speed = next(c for c in a.criteria if c.name == "speed")
    assert speed.measured is None and speed.detail == "not measured: the attempt already fails on toy, which this cannot change"
    assert "fails on toy " in a.reason and "KiB on disk (needs < 1 KiB)" in a.reason
    assert state.recommendation == "The bar that bound the last attempt: toy. The toy bar fails: pick a smaller file."
