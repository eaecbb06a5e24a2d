"""The run report (quantloop/report) of a real pipeline run on the tiny Llama: files, rows, plots, MLflow
artifacts, bad input; rendered in headless Chromium (screenshot, one row per attempt, every image loaded)."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from quantloop.errors import InputError
from report_helpers import RUN_ID, open_browser, tracking_uri

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(finished_run, tmp_path_factory):
    from quantloop.report import write_run_report

    return write_run_report(RUN_ID, tracking_uri(finished_run), tmp_path_factory.mktemp("report") / "out")


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_report_files_rows_and_plots(report, finished_run, dataset_dir):
    assert sorted(p.name for p in report.folder.iterdir()) == ["plots", "report.html", "report.md"]
    assert [p.name for p in report.plots] == ["ppl_vs_size.png", "kld_vs_size.png"]
    assert all(png_size(p)[0] > 400 for p in report.plots)
    md = report.markdown.read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and line.split(" | ")[0] in ("| 0", "| 1", "| 2")]
    assert [r.split(" | ")[1] for r in rows] == ["int4-q4_0", "int4-rtn-q4_0", "int8-q8_0"]
    assert [r.split(" | ")[-2] for r in rows] == ["fallback", "skipped", "accepted"]
    assert "int4-rtn-q4_0 was skipped: size" in rows[1] and " | - | - | - | - | " in rows[1]
    summary = json.loads((finished_run / "quantized" / "tiny" / RUN_ID / "quantization_summary.json").read_text())
    q8 = summary["attempts"][2]
    assert f"{q8['ppl_increase_pct']:+.2f} % ± " in rows[2] and f"{q8['size_ratio']:.2f}x" in rows[2]
    assert "int4-q4_0 fails on perplexity" in rows[0]
    # the held-out column: the same test text judged again under its folder's name gives the same increase
    assert f"| {dataset_dir.name} {q8['ppl_increase_pct']:+.2f} % |" in rows[2]
    assert "**Decision:** ACCEPTED: int8-q8_0" in md and "## Side-by-side generations" in md and "The king said" in md
    html = report.html.read_text()
    assert html.count("<tr class='attempt ") == 3 and html.count("src='data:image/png;base64,") == 2
    assert "src='http" not in html and "href='http" not in html  # self-contained


@pytest.mark.slow
def test_report_is_attached_to_the_mlflow_parent_run(report, finished_run):
    from mlflow.tracking import MlflowClient

    from quantloop.tracking import pipeline_run_records

    parent = pipeline_run_records(tracking_uri(finished_run), RUN_ID)["parent"]["run_id"]
    client = MlflowClient(tracking_uri(finished_run))
    assert {a.path for a in client.list_artifacts(parent, "report")} == {"report/report.html", "report/report.md", "report/plots"}
    assert {a.path for a in client.list_artifacts(parent, "report/plots")} == {"report/plots/ppl_vs_size.png", "report/plots/kld_vs_size.png"}


def test_unknown_run_id_is_one_line_and_exit_2(tmp_path):
    from quantloop.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri).parent_run("another-run", {})  # a store with another run in it
    before = sorted(p.name for p in tmp_path.iterdir())
    out = subprocess.run([sys.executable, "-m", "quantloop.report", "no-such-run", "--tracking-uri", uri, "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("quantloop: error: no run 'no-such-run' in the tracking store")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_store_is_refused_without_creating_one(tmp_path):
    from quantloop.report import write_run_report

    with pytest.raises(InputError, match="no tracking store there"):
        write_run_report(RUN_ID, f"sqlite:///{tmp_path / 'none.db'}", tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_report_folder_that_cannot_be_written_leaves_nothing(finished_run, tmp_path):
    from quantloop.report import write_run_report

    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")
    with pytest.raises(InputError, match="report folder cannot be written"):
        write_run_report(RUN_ID, tracking_uri(finished_run), blocker / "report", log_to_mlflow=False)
    assert blocker.read_text() == "not a folder\n" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
def test_rewriting_a_report_replaces_it_whole(finished_run, tmp_path):
    from quantloop.report import write_run_report

    out = tmp_path / "r"
    out.mkdir()
    (out / "stale.txt").write_text("old\n")
    paths = write_run_report(RUN_ID, tracking_uri(finished_run), out, log_to_mlflow=False)
    assert sorted(p.name for p in out.iterdir()) == ["plots", "report.html", "report.md"] and paths.html.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.slow
def test_report_renders_in_chromium(report, tmp_path):
    with open_browser(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(report.html.as_uri())
        rows = page.locator("#attempts tbody tr").count()
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        decision = page.inner_text("#decision")
        shot = report.folder / "report-screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
    assert rows == 3
    assert len(images) == 2 and all(done and width > 400 for done, width in images)
    assert decision.startswith("ACCEPTED: int8-q8_0")
    assert png_size(shot)[1] > 800
