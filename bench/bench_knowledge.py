"""Knowledge benchmark: a size budget's sensitivity pass on a second checkpoint of a known family, with the first
checkpoint's measurements in the knowledge store as priors, against the full measurement without memory.

    .venv/bin/python bench/bench_knowledge.py [--first smollm2-135m] [--second smollm2-135m-offgrid] [--ratio 3.5]

Each pass measures into its own sensitivity cache folder (nothing is reused between passes but the store; with
--work, a pass whose cache is complete is not measured again, and its row says 0 rows measured). Prints
one table (units measured, rows measured, wall time, the allocation) and the store's atom counts, file size and
load time; writes SLM/reports/bench_knowledge.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import quantloop.search.sensitivity as sensitivity  # noqa: E402
from quantloop.fileio import write_json_atomic  # noqa: E402
from quantloop.knowledge import KnowledgeStore  # noqa: E402
from quantloop.models.checkpoints import resolve_model  # noqa: E402
from quantloop.paths import CHECKPOINTS_DIR, DATASETS_DIR, SLM_DIR  # noqa: E402
from quantloop.pipelines.report_format import table  # noqa: E402
from quantloop.schemas import CalibrationSpec, quant_spec  # noqa: E402
from quantloop.search.budget import fit_to_budget  # noqa: E402


def one_pass(name: str, model: str, spec, store, cache: Path) -> dict:
    sensitivity.CACHE_DIR = cache  # a cache of its own: every row this pass needs is measured in it
    counted = []
    t0 = time.perf_counter()
    fitted, record = fit_to_budget(resolve_model(CHECKPOINTS_DIR / model), spec, progress=lambda *a: counted.append(a), memory=store)
    wall = time.perf_counter() - t0
    lower = {k.strip("^$").replace("\\", ""): t for k, t in fitted.gguf_tensor_types.items() if t in ("Q3_K", "Q2_K")}
    return {"pass": name, "model": model, "units": record.units, "units_measured": len(record.measured_units),
            "units_prior": len(record.prior_units), "rows_measured": len(counted), "wall_s": round(wall, 1),
            "bytes": record.bytes, "lower": dict(sorted(lower.items())), "types": fitted.gguf_tensor_types,
            "prior_sources": record.prior_sources, "prior_ratio": record.prior_ratio, "prior_spread": record.prior_spread}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--first", default="smollm2-135m")
    p.add_argument("--second", default="smollm2-135m-offgrid")
    p.add_argument("--ratio", type=float, default=3.5)
    p.add_argument("--dataset", default=str(DATASETS_DIR / "shakespeare"))
    p.add_argument("--first-store", help="a knowledge store holding the first model's measurements (e.g. SLM/knowledge/"
                                         "atomspace.metta after a run on it): the first pass is not measured")
    p.add_argument("--tag", default="1", help="names the prior-guided pass's cache: a new tag measures it afresh")
    p.add_argument("--work", help="folder of the passes' caches and store (default: a new temporary one); the first pass "
                                  "continues from its cache when given again")
    a = p.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-knowledge-"))
    whole = {"embeddings": "IQ4_NL", "attention": "IQ4_NL", "feed_forward": "IQ4_NL"}
    spec = quant_spec(method="gptq", gguf_type="IQ4_NL", layer_types=whole, min_size_ratio=a.ratio,
                      calibration=CalibrationSpec(dataset_dir=a.dataset, samples=128, seqlen=256))
    work.mkdir(parents=True, exist_ok=True)
    first_store, store_path = work / "first.metta", work / f"second-{a.tag}.metta"
    rows = []
    if a.first_store:  # the first model's atoms as a run recorded them (its sensitivity pass is not measured again)
        first_store = Path(a.first_store)
        if not KnowledgeStore.open(first_store).facts("Measurement"):
            sys.exit(f"bench_knowledge: {first_store} holds no measurement: run the first model with memory first")
    else:
        rows.append(one_pass("first, recorded", a.first, spec, KnowledgeStore.open(first_store), work / "c1"))
        if not rows[0]["rows_measured"] and not first_store.exists():
            sys.exit(f"bench_knowledge: --ratio {a.ratio} is decided without measuring on {a.first} (the planned file fits, "
                     f"or every unit that can go lower must): nothing to compare; pick a ratio between the two")
    shutil.copyfile(first_store, store_path)  # the first model's atoms only: what the second run starts from
    KnowledgeStore.open(store_path).forget(a.second)
    rows += [one_pass("second, priors", a.second, spec, KnowledgeStore.open(store_path), work / f"c2-{a.tag}"),
             one_pass("second, full", a.second, spec, None, work / "c3")]
    same = rows[-2]["types"] == rows[-1]["types"]
    print(table(["pass", "model", "units", "measured", "priors", "rows measured", "wall s", "bytes", "below 4 bits"],
                [[r["pass"], r["model"], r["units"], r["units_measured"], r["units_prior"], r["rows_measured"], r["wall_s"],
                  f"{r['bytes']:,}", len(r["lower"])] for r in rows]))
    print(f"allocation with priors {'identical to' if same else 'DIFFERS from'} the full one")
    t0 = time.perf_counter()
    store = KnowledgeStore.open(store_path)
    stats = store.stats() | {"load_s": time.perf_counter() - t0}
    print(f"store: {stats['atoms']} atoms {stats['by_kind']}, {stats['file_bytes']:,} bytes, loaded in {stats['load_s']:.3f} s")
    for r in rows:
        r.pop("types")
    write_json_atomic(SLM_DIR / "reports" / "bench_knowledge.json", {"passes": rows, "identical": same, "store": stats,
                                                                     "ratio": a.ratio, "threads": os.environ.get("QUANTLOOP_THREADS")})


if __name__ == "__main__":
    main()
