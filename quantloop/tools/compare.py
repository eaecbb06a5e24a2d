"""compare_outputs: two models' greedy generations side by side (JSON and Markdown)."""

from __future__ import annotations

from quantloop.eval.session import open_runner
from quantloop.models.checkpoints import resolve_model
from quantloop.schemas import CompareReport, CompareRequest, CompareRow
from quantloop.specs import load_quality_spec


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>").strip() or "*(empty)*"


def compare_outputs(req: CompareRequest) -> CompareReport:
    spec = load_quality_spec(req.spec_file)
    prompts = req.prompts or spec.generation.prompts
    runners = []
    for path in (req.model_a, req.model_b):
        m = resolve_model(path)
        runners.append(open_runner(m, "llama.cpp" if m.gguf is not None else "transformers", spec.eval.context))
    a, b = runners
    rows = []
    for p in prompts:
        out_a = a.detokenize(a.generate_greedy(a.tokenize(p), req.max_new_tokens))
        out_b = b.detokenize(b.generate_greedy(b.tokenize(p), req.max_new_tokens))
        rows.append(CompareRow(prompt=p, output_a=out_a, output_b=out_b, identical=out_a == out_b))
    md = [f"| prompt | A: `{a.ref.path}` ({a.ref.format}) | B: `{b.ref.path}` ({b.ref.format}) |", "|---|---|---|"]
    md += [f"| {_md_cell(r.prompt)} | {_md_cell(r.output_a)} | {_md_cell(r.output_b)} |" for r in rows]
    return CompareReport(model_a=a.ref, model_b=b.ref, rows=rows, identical_rate=sum(r.identical for r in rows) / len(rows),
                         markdown="\n".join(md) + "\n")
