"""search_mixed_precision: a multi-objective search over per-unit GGUF types that returns the measured Pareto
front (mean KLD on held-out text of several domains, exact file bytes, llama-bench tg speed), seeded with the
greedy and integer-program allocations from the sensitivity table; run_search_worker: one worker of it (any
machine that reaches the storage); best_precision_map_for_budget: the agents' policy step."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from quantloop.backends.gguf import cached_imatrix
from quantloop.data.calibration import calibration_text_file
from quantloop.errors import InputError
from quantloop.gguf.precision_map import imatrix_header_bytes
from quantloop.models.checkpoints import resolve_model
from quantloop.schemas import CalibrationSpec, quant_spec
from quantloop.search.allocate import budget_bytes_for_bpw, check_budget, greedy, ilp, unit_options, unit_table
from quantloop.search.hardware import check_target
from quantloop.search.measure import Baseline, summarize, tg_speed
from quantloop.search.precision_maps import read_map, spec_fields
from quantloop.search.schemas import (
    Allocation,
    FrontMember,
    SearchRequest,
    SearchResult,
    SensitivityRequest,
    SensitivityResult,
    TextSpec,
)
from quantloop.search.study import (
    create_study,
    enqueue_seed,
    finished,
    load_study,
    open_storage,
    param_name,
    run_trials,
    suggest_genome,
)
from quantloop.search.tensors import genome_bits_per_weight, genome_bytes, model_tensors, smallest_genome
from quantloop.tools.quantize import quantize_model
from quantloop.tools.search_report import report_search
from quantloop.tools.sensitivity import measure_sensitivity


def imatrix_calibration(text: list, samples: int = 32, seqlen: int = 256):
    """The calibration text of the candidates' importance matrix: the calibration split of the search's domains,
    `samples` windows shared among them in turn (or the model's own generations when the text is synthetic)."""
    dirs = [t.dataset_dir for t in text if t.source == "dataset"]
    if not dirs:
        return CalibrationSpec(source="synthetic", samples=samples, seqlen=seqlen)
    return CalibrationSpec(dataset_dir=dirs[0], mix=dirs[1:], samples=samples, seqlen=seqlen)


def imatrix_extra_header(imatrix: dict | None, model) -> int:
    """Metadata bytes llama-quantize adds to every candidate quantized with the search's importance matrix (computed
    here once, then cached; the backend reuses it), so that the size estimate stays exact."""
    if not imatrix:
        return 0

    calib = CalibrationSpec(**imatrix)
    with tempfile.TemporaryDirectory() as d:
        text, _ = calibration_text_file(calib, model.hf_dir, Path(d))
        return imatrix_header_bytes(cached_imatrix(model.gguf, text, calib.samples, calib.seqlen))


def sensitivity_for(req: SearchRequest, out_dir: Path) -> SensitivityResult:
    return measure_sensitivity(SensitivityRequest(model=req.model, text=req.sensitivity_text, types=req.types,
                                                  granularity=req.granularity, heatmap_png=str(out_dir / "sensitivity_heatmap.png"),
                                                  threads=req.threads))


def baselines(mt, sens: SensitivityResult, budgets_bpw: list[float]) -> list[Allocation]:
    out = []
    for bpw in budgets_bpw:
        b = budget_bytes_for_bpw(mt, bpw)
        out += [greedy(mt, sens.rows, b), ilp(mt, sens.rows, b)]
    return out


def _choice(alloc: Allocation, units) -> dict[str, str]:
    return {u: alloc.genome[ts[0]] for u, (ts, _) in units.items()}


def make_objective(config: dict, worker: dict):
    """The measured objective of one trial: quantize_model with the trial's precision map, exact bytes checked
    against the written file, KLD on llama.cpp against the F16 model, llama-bench tg speed."""
    import optuna  # deferred: optuna


    mt, units, baseline, extra_header = worker["mt"], worker["units"], worker["baseline"], worker["extra_header"]
    work = Path(config["out_dir"]) / ".trials"
    work.mkdir(parents=True, exist_ok=True)

    def objective(trial):
        genome = suggest_genome(trial, units)
        nbytes = genome_bytes(mt, genome, extra_header)
        bpw = genome_bits_per_weight(mt, genome)
        trial.set_user_attr("bytes", nbytes)
        trial.set_user_attr("bits_per_weight", bpw)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if config.get("max_bpw") and bpw > config["max_bpw"]:
            raise optuna.TrialPruned(f"{bpw:.3f} bits per weight is above the {config['max_bpw']} limit")
        same = [t for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if all(t.params.get(param_name(u)) == trial.params[param_name(u)] for u in units)]
        if same:  # the sampler proposed a measured map again: reuse its measurement
            trial.set_user_attr("duplicate_of", same[0].number)
            for k in ("measured",):
                trial.set_user_attr(k, same[0].user_attrs[k])
            return tuple(same[0].values)
        with tempfile.TemporaryDirectory(dir=work) as d:
            q = quantize_model(config["model"], Path(d) / "candidate", quant_spec(**spec_fields(genome, config.get("imatrix"))))
            written = Path(q.model_path).stat().st_size
            if written != nbytes:
                raise RuntimeError(f"size estimate {nbytes} bytes, file written {written} bytes")
            by_domain = baseline.kld(Path(q.model_path))
            tg = tg_speed(Path(q.model_path), config["speed_tokens"], config["speed_repeats"], config.get("threads"))
        kld, ppl = summarize(by_domain)
        m = {"kld_mean": kld, "kld_by_domain": {d: v["kld_mean"] for d, v in by_domain.items()}, "ppl_increase_pct": ppl,
             "bytes": nbytes, "bytes_written": written, "bits_per_weight": bpw, "tg_tokens_per_s": tg}
        trial.set_user_attr("measured", m)
        return kld, float(nbytes), tg

    return objective


def _worker_state(config: dict) -> dict:
    model = resolve_model(config["model"])
    mt = model_tensors(model.gguf, tuple(config["types"]) + ("F16",))
    units = {u: (ts, tuple(types)) for u, (ts, types) in config["units"].items()}
    baseline = Baseline(model.gguf, model.hf_dir, [TextSpec(**t) for t in config["text"]], config.get("threads"))
    return {"mt": mt, "units": units, "baseline": baseline, "extra_header": imatrix_extra_header(config.get("imatrix"), model)}


def run_search_worker(storage_url: str, study_name: str) -> int:
    """Join the search `study_name` in the storage and run trials until it holds its number of trials."""
    study, config = load_study(open_storage(storage_url), study_name)
    return run_trials(study, make_objective(config, _worker_state(config)), config["trials"])


def fail_dead_local_trials(study) -> list[int]:
    """A journal file has no heartbeat: on resume, fail (and queue again) the running trials of workers on this
    host whose process is gone."""
    import optuna  # deferred: optuna

    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        h, _, pid = str(t.user_attrs.get("worker", "")).partition(":")
        if h == host and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"origin": t.user_attrs.get("origin", "sampler"), "retry_of": t.number})
            failed.append(t.number)
    return failed


def _spawn_workers(storage_url: str, study: str, n: int) -> None:
    cmd = [sys.executable, "-m", "quantloop.pipelines.search_command", "search-worker", "--storage", storage_url, "--study", study]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    errors = [p.communicate()[1] for p in procs]
    bad = [(p.returncode, e) for p, e in zip(procs, errors) if p.returncode != 0]
    if bad:
        raise RuntimeError(f"a search worker exited with code {bad[0][0]}: {bad[0][1].strip().splitlines()[-1:] or ''}")


def search_mixed_precision(req: SearchRequest, progress=None) -> SearchResult:
    t0 = time.perf_counter()
    check_target(req.target)
    out_dir = Path(req.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage_url = req.storage or str(out_dir / "search.journal")
    storage = open_storage(storage_url)
    model = resolve_model(req.model)
    if model.gguf is None or model.hf_dir is None:
        raise InputError(model.path, "the search needs a prepared checkpoint (transformers + F16 GGUF)", "run `quantloop prepare` on it first")
    mt = model_tensors(model.gguf, tuple(req.types) + ("F16",))
    smallest = check_budgets(mt, req)
    user_maps = read_seed_maps(req, mt)
    sens = sensitivity_for(req, out_dir)
    units = unit_table(sens, mt)
    options = unit_options(mt, sens.rows)
    for bpw in req.budgets_bpw:
        check_budget(mt, options, budget_bytes_for_bpw(mt, bpw))
    allocs = baselines(mt, sens, req.budgets_bpw)
    config = req.model_dump(mode="json") | {"model": str(model.path), "units": {u: [ts, list(ty)] for u, (ts, ty) in units.items()},
                                            "out_dir": str(out_dir), "smallest_bytes": smallest}
    study, created = create_study(storage, req.study, config, req.resume)
    if created:
        for a in allocs:
            enqueue_seed(study, _choice(a, units), f"{a.method}@{a.bits_per_weight:.2f}")
        for path, genome in user_maps:
            enqueue_seed(study, map_choice(genome, units, path), f"map:{Path(path).name}")
    elif "://" not in storage_url:
        fail_dead_local_trials(study)
    before = {t.number for t in finished(study)}
    if req.workers == 1:
        run_search_worker(storage_url, req.study)
    elif req.workers > 1:
        _spawn_workers(storage_url, req.study, req.workers)

    return report_search(req, study, storage_url, mt, sens, allocs, before, out_dir, t0)


def read_seed_maps(req: SearchRequest, mt) -> list[tuple[str, dict[str, str]]]:
    """Every --seed-map, checked against the model (names, types it can hold) before anything runs."""
    full = model_tensors(mt.gguf)
    out = []
    for p in req.seed_maps:
        genome = read_map(p, full)[1]
        bad = [n for n, t in genome.items() if t not in mt.by_name()[n].types]
        if bad:
            raise InputError(p, f"tensor {bad[0]} is {genome[bad[0]]}, not one of the search's types", f"use --types {','.join(req.types)}")
        out.append((p, genome))
    return out


def map_choice(genome: dict[str, str], units, where) -> dict[str, str]:
    choice = {}
    for u, (ts, types) in units.items():
        kinds = {genome[n] for n in ts}
        if len(kinds) > 1 or next(iter(kinds)) not in types:
            raise InputError(where, f"the map gives the tensors of unit {u} the types {', '.join(sorted(kinds))}",
                             "a seed map must give one searchable type per unit (or use --granularity tensor)")
        choice[u] = kinds.pop()
    return choice


def check_budgets(mt, req: SearchRequest) -> int:
    smallest = genome_bytes(mt, smallest_genome(mt))
    if req.max_bpw is not None:
        if budget_bytes_for_bpw(mt, req.max_bpw) < smallest:
            raise InputError(None, f"--max-bpw {req.max_bpw} is below the smallest possible file ({smallest:,} bytes)",
                             "raise it or allow smaller types")
    return smallest


def best_precision_map_for_budget(result_json: str | Path, budget_bpw: float, max_kld: float | None = None) -> FrontMember | None:
    """The policy step: the front member of a finished search with the lowest measured KLD (test split where
    validated) that fits `budget_bpw` bits per weight (and `max_kld`), or None. Its map_yaml is a QuantSpec."""
    path = Path(result_json)
    if not path.is_file():
        raise InputError(path, "no search result", "run `quantloop search` first")
    result = SearchResult.model_validate_json(path.read_text())
    fits = [m for m in result.front if m.measured.bits_per_weight <= budget_bpw and m.map_yaml]
    fits = [m for m in fits if max_kld is None or member_kld(m) <= max_kld]
    return min(fits, key=member_kld) if fits else None


def member_kld(member: FrontMember) -> float:
    """A front member's mean KLD: on the test split where it was validated, else as the search measured it."""
    return member.test_kld_mean if member.test_kld_mean is not None else member.measured.kld_mean


def member_spec(member: FrontMember):
    """The QuantSpec (method gguf, one type per tensor) of a front member's precision map."""
    fields = {k: v for k, v in yaml.safe_load(Path(member.map_yaml).read_text()).items() if k != "quantloop_search"}
    return quant_spec(**fields)


def spec_for_budget(result_json: str | Path, budget_bpw: float, max_kld: float | None = None):
    """The QuantSpec of best_precision_map_for_budget's pick, or None: what the QuantizationAgent passes to
    quantize_model."""
    member = best_precision_map_for_budget(result_json, budget_bpw, max_kld)
    return None if member is None else member_spec(member)
