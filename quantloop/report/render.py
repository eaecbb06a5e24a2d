"""The run report as Markdown and as one self-contained HTML page (plots embedded as data: URIs)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from quantloop.eval.criteria.base import Cell, bar_text, row_cells, sections
from quantloop.report.records import AttemptRow, RunRecord

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 76rem; color: #1f2328; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.5rem; vertical-align: top; text-align: left; }
th { background: #f6f8fa; } td.num { text-align: right; white-space: nowrap; }
tr.accepted td { background: #dafbe1; } .verdict-fallback, .verdict-rejected { color: #cf222e; }
.decision { font-size: 1.1rem; font-weight: 600; } figure { display: inline-block; margin: 0.5rem; }
img { max-width: 36rem; border: 1px solid #d0d7de; } code { font-size: 0.85rem; }
"""


def fmt(v, pattern: str) -> str:
    return "-" if v is None else pattern.format(v)


def row(a: AttemptRow) -> list[Cell]:
    """One attempt: what it was, each criterion's cells (in the registry's order), the verdict and why."""
    return [Cell("#", str(a.index), numeric=False), Cell("step", a.step, numeric=False), Cell("method", a.method or "-", numeric=False),
            Cell("format", a.format or "-", numeric=False), Cell("bits/weight", fmt(a.bits_per_weight, "{:.2f}")),
            *row_cells(a.metrics, "report"), Cell("verdict", a.verdict or a.status, numeric=False), Cell("reason", a.reason, numeric=False)]


def headers() -> list[str]:
    return [c.header for c in row(AttemptRow(index=0, step="", status="", mlflow_run_id=""))]


def attempt_cells(a: AttemptRow) -> list[str]:
    return [c.text for c in row(a)]


def decision_text(r: RunRecord) -> str:
    if r.decision == "accepted":
        return f"ACCEPTED: {r.accepted_step}" + (f" (registered as {r.registered_model})" if r.registered_model else "")
    if r.decision == "rejected":
        return f"REJECTED: no step passed. Recommendation: {r.recommendation}"
    return f"{r.decision}: the run has not finished"


def baseline_rows(r: RunRecord) -> list[tuple[str, str]]:
    b = r.baseline
    rows = [("model", b.model), ("format", b.format or "-"), ("test perplexity", fmt(b.test_ppl, "{:.4f}")),
            ("size", fmt(b.bytes_on_disk and b.bytes_on_disk / 2**20, "{:.1f} MiB")), ("bits/weight", fmt(b.bits_per_weight, "{:.2f}")),
            ("token generation", fmt(b.tg_tokens_per_s, "{:.1f} tok/s")), ("text", b.dataset or "-"), ("note", b.reference_note or "-")]
    for c in b.checkpoints:
        rows.append((f"checkpoint {c.get('name')}", f"validation perplexity {fmt(c.get('validation_ppl'), '{:.4f}')}, {c.get('path')}"))
    return rows


def criterion_sections(r: RunRecord):
    """The criteria's own tables (e.g. benchmark accuracy per task), from the measured attempts."""
    return sections([(f"{a.index}: {a.step}", a.metrics) for a in r.attempts if a.metrics])


def md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_report(r: RunRecord, plots: list[Path]) -> str:
    out = [f"# quantloop run {r.run_id}", "", f"**Decision:** {decision_text(r)}", "",
           f"Target: {r.target or '-'}. Acceptance bar: {bar_text(r.acceptance, 'report')}.", "", "## Baseline", "", "| | |", "|---|---|"]
    out += [f"| {md_cell(k)} | {md_cell(v)} |" for k, v in baseline_rows(r)]
    names = headers()
    out += ["", "## Attempts", "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    out += ["| " + " | ".join(md_cell(c) for c in attempt_cells(a)) + " |" for a in r.attempts]
    for sec in criterion_sections(r):
        out += ["", f"## {sec.title}", "", sec.note + ".", "", "| " + " | ".join(map(md_cell, sec.headers)) + " |", "|" + "---|" * len(sec.headers)]
        out += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in sec.rows]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    gens = [a for a in r.attempts if a.generations_md]
    if gens:
        out += ["", "## Side-by-side generations"]
        for a in gens:
            body = a.generations_md.split("\n", 1)[1] if a.generations_md.startswith("# ") else a.generations_md
            out += ["", f"### {a.index}: {a.step}", "", body.strip()]
    out += ["", f"MLflow: tracking store `{r.tracking_uri}`, parent run `{r.mlflow_parent_run_id}`.", ""]
    return "\n".join(out)


def split_pipe_row(line: str) -> list[str]:
    """Cells of a Markdown table row, honouring escaped pipes."""
    cells, cur, i, s = [], "", 0, line.strip().strip("|")
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] == "|":
            cur, i = cur + "|", i + 2
            continue
        if s[i] == "|":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += s[i]
        i += 1
    return cells + [cur.strip()]


def generations_html(md: str) -> str:
    """generations.md (a title, a pipe table, a closing line) as HTML."""
    lines = [x for x in md.splitlines() if x.strip()]
    table = [x for x in lines if x.lstrip().startswith("|") and not set(x.replace("|", "").strip()) <= {"-", ":"}]
    rest = [x for x in lines if not x.lstrip().startswith("|") and not x.startswith("# ")]
    cell = lambda c: re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(c).replace("&lt;br&gt;", "<br>"))  # noqa: E731
    rows = [split_pipe_row(x) for x in table]
    head = "".join(f"<th>{cell(c)}</th>" for c in rows[0]) if rows else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table class='generations'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" + "".join(
        f"<p>{html.escape(x)}</p>" for x in rest)


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def html_report(r: RunRecord, plots: list[Path]) -> str:
    e = html.escape
    rows = []
    for a in r.attempts:
        cells = "".join(f"<td class='{'num' if c.numeric else ''}'>{e(c.text)}</td>" for c in row(a))
        rows.append(f"<tr class='attempt {e(a.verdict)}' data-index='{a.index}'>{cells}</tr>")
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>quantloop run {e(r.run_id)}</title>",
           f"<style>{STYLE}</style></head><body>", f"<h1>quantloop run <code>{e(r.run_id)}</code></h1>",
           f"<p class='decision' id='decision'>{e(decision_text(r))}</p>",
           f"<p>Target: {e(r.target or '-')}. Acceptance bar: {e(bar_text(r.acceptance, 'report'))}.</p>",
           "<h2>Baseline</h2><table id='baseline'><tbody>",
           *(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in baseline_rows(r)),
           "</tbody></table><h2>Attempts</h2><table id='attempts'><thead><tr>",
           *(f"<th>{e(h)}</th>" for h in headers()), "</tr></thead><tbody>", *rows, "</tbody></table>"]
    for sec in criterion_sections(r):
        out += [f"<h2>{e(sec.title)}</h2><p>{e(sec.note)}.</p><table class='criterion'><thead><tr>",
                *(f"<th>{e(h)}</th>" for h in sec.headers), "</tr></thead><tbody>",
                *("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in sec.rows), "</tbody></table>"]
    if plots:
        out.append("<h2>Plots</h2>")
        out += [f"<figure><img alt='{e(p.stem)}' src='{png_data_uri(p)}'><figcaption>{e(p.stem)}</figcaption></figure>" for p in plots]
    gens = [a for a in r.attempts if a.generations_md]
    if gens:
        out.append("<h2>Side-by-side generations</h2>")
        for a in gens:
            opened = " open" if a.verdict == "accepted" or a is gens[-1] else ""
            out.append(f"<details{opened}><summary>{a.index}: {e(a.step)} ({e(a.verdict)})</summary>{generations_html(a.generations_md)}</details>")
    out.append(f"<p>MLflow: tracking store <code>{e(r.tracking_uri)}</code>, parent run <code>{e(r.mlflow_parent_run_id)}</code>.</p>")
    out.append("</body></html>\n")
    return "\n".join(out)
