"""The run report (`quantloop report RUN_ID`, and the end of `quantloop run`): one self-contained HTML page and its
Markdown twin, with the baseline, every attempt as a row, the decision, side-by-side generations and plots;
the HTML, the Markdown and the PNG plots are attached to the run's MLflow parent run under report/.

    from quantloop.report import write_run_report
    paths = write_run_report(state.run_id, tracking_uri)   # -> ReportPaths(html, markdown, plots)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from quantloop.errors import InputError
from quantloop.fileio import atomic_output
from quantloop.names import check_run_id, under
from quantloop.paths import SLM_DIR
from quantloop.report.plots import write_plots
from quantloop.report.records import load_run_record
from quantloop.report.render import html_report, markdown_report
from quantloop.tracking import log_report_artifacts

REPORTS_DIR = SLM_DIR / "reports"
HTML_NAME = "report.html"
MARKDOWN_NAME = "report.md"


@dataclass
class ReportPaths:
    folder: Path
    html: Path
    markdown: Path
    plots: list[Path] = field(default_factory=list)

    def files(self) -> list[Path]:
        return [self.html, self.markdown, *self.plots]


def write_run_report(run_id: str, tracking_uri: str | None = None, out_dir: str | Path | None = None,
                     log_to_mlflow: bool = True) -> ReportPaths:
    """Write OUT/report.html, OUT/report.md and OUT/plots/*.png (OUT: out_dir, default SLM/reports/RUN_ID) for a run in
    the tracking store, all at once (a temporary folder renamed into place), then attach them to the MLflow parent run."""
    check_run_id(run_id)
    final = Path(out_dir) if out_dir else under(REPORTS_DIR, run_id, what="report folder")
    record = load_run_record(run_id, tracking_uri)
    try:
        with atomic_output(final, is_dir=True, fault="report") as tmp:
            plots = write_plots(record, tmp / "plots")
            (tmp / MARKDOWN_NAME).write_text(markdown_report(record, plots), encoding="utf-8")
            (tmp / HTML_NAME).write_text(html_report(record, plots), encoding="utf-8")
            names = [p.name for p in plots]
    except OSError as e:
        raise InputError(final, f"report folder cannot be written ({e.strerror or e})", "pass a writable --out folder") from None
    paths = ReportPaths(final, final / HTML_NAME, final / MARKDOWN_NAME, [final / "plots" / n for n in names])
    if log_to_mlflow:
        log_report_artifacts(record.tracking_uri, record.mlflow_parent_run_id, paths.files())
    return paths
