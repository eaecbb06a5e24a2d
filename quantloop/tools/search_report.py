"""After the trials: the measured front as precision maps (JSON + YAML), front members re-validated on the
test split (quantize_model, then KLD against the F16 model on llama.cpp), the pictures, MLflow, the result file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from quantloop.fileio import write_json_atomic
from quantloop.models.checkpoints import resolve_model
from quantloop.schemas import quant_spec
from quantloop.search.allocate import unit_table
from quantloop.search.hardware import estimated_fields
from quantloop.search.measure import Baseline, summarize
from quantloop.search.plots import bits_heatmap, front_plot
from quantloop.search.precision_maps import write_map
from quantloop.search.schemas import CandidateMeasurement, FrontMember, SearchRequest, SearchResult
from quantloop.search.study import front_2d, param_name, pareto_front
from quantloop.search.tensors import BLOCK32, FLOAT16, KQUANTS, bytes_per_weight
from quantloop.tools.quantize import quantize_model
from quantloop.tracking import Tracker, flatten


def _genome(trial, units) -> dict[str, str]:
    return {n: trial.params[param_name(u)] for u, (ts, _) in units.items() for n in ts}


def _validate(req: SearchRequest, members: list[FrontMember], out_dir: Path) -> None:
    """Quantize each member with quantize_model from its YAML map and measure it on the test split."""
    if not members or not req.test_text:
        return
    model = resolve_model(req.model)
    base = Baseline(model.gguf, model.hf_dir, req.test_text, req.threads)
    for m in members:
        fields = {k: v for k, v in yaml.safe_load(Path(m.map_yaml).read_text()).items() if k != "quantloop_search"}
        q = quantize_model(req.model, out_dir / "front" / f"trial-{m.trial}", quant_spec(**fields), overwrite=True)
        kld, ppl = summarize(base.kld(Path(q.model_path)))
        m.test_kld_mean, m.test_ppl_increase_pct = kld, ppl


def report_search(req: SearchRequest, study, storage_url: str, mt, sens, allocs, before: set[int], out_dir: Path, t0: float) -> SearchResult:
    import optuna  # deferred: optuna


    units = unit_table(sens, mt)
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if "measured" in t.user_attrs]
    front3 = pareto_front(study)
    members = []
    for t in front3:
        genome = _genome(t, units)
        info = {"trial": t.number, "origin": t.user_attrs.get("origin", req.sampler), "measured": {k: v for k, v in t.user_attrs["measured"].items()}}
        j, y = write_map(genome, out_dir / "maps" / f"trial-{t.number}", info, req.imatrix)
        members.append(FrontMember(trial=t.number, origin=info["origin"], map_json=str(j), map_yaml=str(y),
                                   measured=CandidateMeasurement(genome=genome, **t.user_attrs["measured"]),
                                   estimated=estimated_fields(req.target, int(t.values[1]) - mt.fixed_bytes, mt.n_weights)))
    # re-validate the members of the KLD-vs-bytes front first (fewest bytes first), at most validate_front of them
    two_d = {t.number for t in front_2d([t for t in front3])}
    chosen = [m for m in members if m.trial in two_d][: req.validate_front]
    _validate(req, chosen, out_dir)
    pts = [{"bpw": t.user_attrs["measured"]["bits_per_weight"], "kld": t.values[0], "tg": t.values[2]} for t in complete]
    fr = [{"bpw": m.measured.bits_per_weight, "kld": m.measured.kld_mean, "tg": m.measured.tg_tokens_per_s}
          for m in members if m.trial in two_d]
    marks = [{"bpw": t.user_attrs["measured"]["bits_per_weight"], "kld": t.values[0], "label": t.user_attrs["origin"],
              "marker": "x" if t.user_attrs["origin"].startswith("greedy") else "+", "color": "red"}
             for t in complete if str(t.user_attrs.get("origin", "")).startswith(("greedy", "ilp")) and "retry_of" not in t.user_attrs]
    marks += req_marks(req)
    front_png = front_plot(pts, fr, marks, out_dir / "front.png", f"{Path(req.model).name}: {len(complete)} measured trials, target {req.target}") if pts else None
    heat_png = None
    if members:
        pick = min(members, key=lambda m: abs(m.measured.bits_per_weight - (req.budgets_bpw[0] if req.budgets_bpw else 5.0)))
        bits = {t: 8 * bytes_per_weight(t) for t in BLOCK32 + KQUANTS + (FLOAT16,)}
        heat_png = bits_heatmap(pick.measured.genome, bits, out_dir / f"bits-trial-{pick.trial}.png",
                                f"trial {pick.trial}: {pick.measured.bits_per_weight:.2f} bpw, KLD {pick.measured.kld_mean:.4f}")
    result = SearchResult(study=req.study, storage=storage_url.split("@")[-1], trials_complete=len(complete),
                          trials_measured_here=len([t for t in complete if t.number not in before]), front=members,
                          baselines=allocs, target=req.target, front_png=str(front_png) if front_png else None,
                          heatmap_png=str(heat_png) if heat_png else None, result_json=str(out_dir / "search_result.json"),
                          wall_s=time.perf_counter() - t0)
    write_json_atomic(out_dir / "search_result.json", result)
    if req.tracking_uri:
        log_to_mlflow(req, result, [sens.heatmap_png])
    return result


def req_marks(req: SearchRequest) -> list[dict]:
    """Extra points (llama.cpp's fixed mixes) a caller measured and left in out_dir/marks.json."""
    p = Path(req.out_dir) / "marks.json"
    return json.loads(p.read_text()) if p.is_file() else []


def log_to_mlflow(req: SearchRequest, result: SearchResult, extra_files: list) -> str:
    """One parent run per search, one nested run per front member, the pictures and the result as artifacts."""
    tr = Tracker(req.tracking_uri)
    parent = tr.client.create_run(tr.experiment_id, run_name=f"search-{req.study}", tags={"quantloop.kind": "search"})
    pid = parent.info.run_id
    params = {k: v for k, v in flatten(req.model_dump(mode="json")).items() if not k.startswith(("text", "sensitivity_text", "test_text"))}
    tr._log(pid, params={k: str(v) for k, v in params.items()},
            metrics={"trials_complete": result.trials_complete, "front_size": len(result.front), "wall_s": result.wall_s})
    for m in result.front:
        run = tr.client.create_run(tr.experiment_id, run_name=f"trial-{m.trial}",
                                   tags={"mlflow.parentRunId": pid, "origin": m.origin, "quantloop.kind": "search-member"})
        metrics = {k: v for k, v in m.measured.model_dump().items() if isinstance(v, (int, float))}
        metrics |= {f"kld.{d}": v for d, v in m.measured.kld_by_domain.items()} | m.estimated
        if m.test_kld_mean is not None:
            metrics |= {"test_kld_mean": m.test_kld_mean, "test_ppl_increase_pct": m.test_ppl_increase_pct}
        tr._log(run.info.run_id, params={"trial": str(m.trial), "origin": m.origin}, metrics=metrics)
        for f in (m.map_json, m.map_yaml):
            tr.client.log_artifact(run.info.run_id, f)
        tr.client.set_terminated(run.info.run_id, "FINISHED")
    for f in [result.front_png, result.heatmap_png, result.result_json, *extra_files]:
        if f and Path(f).is_file():
            tr.client.log_artifact(pid, f)
    tr.client.set_terminated(pid, "FINISHED")
    return pid
