"""MLflow review in a real browser: an MLflow server on 127.0.0.1 over a finished run's store, its UI opened in
headless Chromium: the experiment's runs table shows one row per attempt under the parent run, and the
parent run's artifacts hold the run report, which MLflow renders (every attempt a row, every plot loaded)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from quantloop.tracking import pipeline_run_records
from report_helpers import RUN_ID, open_browser, tracking_uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(finished_run, tmp_path_factory):
    """`mlflow server` on 127.0.0.1 over the run's store, after the run report was attached to the parent run."""
    from quantloop.report import write_run_report

    write_run_report(RUN_ID, tracking_uri(finished_run), tmp_path_factory.mktemp("report") / "out")
    port = free_port()
    log = open(tmp_path_factory.mktemp("mlflow") / "server.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", tracking_uri(finished_run),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=finished_run, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, f"mlflow server exited: {Path(log.name).read_text()[-2000:]}"
            assert time.monotonic() < deadline, "mlflow server did not answer within 240 s"
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_mlflow_ui_shows_every_attempt_and_the_report(mlflow_ui, finished_run, tmp_path):
    records = pipeline_run_records(tracking_uri(finished_run), RUN_ID)
    parent = records["parent"]["run_id"]
    attempt_names = [f"{r['tags']['quantloop.attempt']}-{r['tags']['step']}" for r in records["attempts"]]
    assert len(attempt_names) == 3
    experiment = pipeline_experiment_id(finished_run)
    with open_browser(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.set_default_timeout(90_000)
        page.goto(f"{mlflow_ui}/#/experiments/{experiment}/runs")
        name_cells = page.locator("[role=gridcell][col-id='attributes.`Run Name`']")
        name_cells.filter(has_text=RUN_ID).first.locator("button").click()  # expand the parent run: its attempts are nested
        page.get_by_text(attempt_names[-1], exact=True).wait_for()
        shown = [text.split("\n")[-1] for text in name_cells.all_inner_texts()]
        page.screenshot(path=str(tmp_path / "mlflow-runs.png"))

        page.goto(f"{mlflow_ui}/#/experiments/{experiment}/runs/{parent}/artifacts")
        page.get_by_text("report", exact=True).first.click()
        page.get_by_text("report.html", exact=True).wait_for()
        listed = {name: page.get_by_text(name, exact=True).count() for name in ("report.html", "report.md", "plots")}
        page.get_by_text("report.html", exact=True).click()
        frame = next_frame_with(page, "#attempts")
        rendered_rows = frame.locator("#attempts tbody tr").count()
        images = frame.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        page.screenshot(path=str(tmp_path / "mlflow-run-report.png"))
    assert sorted(n for n in shown if n != RUN_ID) == sorted(attempt_names) and RUN_ID in shown
    assert listed == {"report.html": 1, "report.md": 1, "plots": 1}
    assert rendered_rows == len(attempt_names)
    assert len(images) == 2 and all(done and width > 400 for done, width in images)


def pipeline_experiment_id(folder: Path) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri(folder)).get_experiment_by_name("quantloop").experiment_id


def next_frame_with(page, selector: str, timeout_s: float = 90):
    """The frame (MLflow previews HTML artifacts in an iframe) that shows `selector`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for frame in page.frames:
            if frame is not page.main_frame and frame.locator(selector).count():
                return frame
        page.wait_for_timeout(500)
    raise AssertionError(f"no frame shows {selector}")
