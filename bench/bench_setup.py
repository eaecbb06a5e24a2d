"""Set-up time (scripts/setup.sh, the first part of `make run` and `make test`), cold and warm, by step.

    python3 bench/bench_setup.py              # cold, then the two warm cases below
    python3 bench/bench_setup.py --warm-only  # only a new clone's set-up on this machine's own cache
    python3 bench/bench_setup.py --installer pip

Every run goes into a temporary folder; the machine's virtual environments and ~/.cache/quantloop are not touched:
  cold         an empty QUANTLOOP_CACHE, a new venv, empty pip, uv and ccache caches (a fresh machine: downloads
               the llama-cpp-python sdist, compiles llama.cpp, installs every package; the network is used);
  warm clone   the cache the cold run filled and a new venv (`git clone` then `make run` on a machine that was set
               up before: the packages come from uv's cache, nothing compiles);
  warm again   the same venv once more (the second `make run` in a clone: only the up-to-date check).
With --warm-only, "warm clone" uses ~/.cache/quantloop (or $QUANTLOOP_CACHE) as it is, and the machine's pip and uv
caches. Runs with the system python3 (no venv needed). Prints each run's time by step and its total, the number of
cores and the load average before and after (the set-up is CPU-bound: say when the machine was shared), and writes
SLM/reports/bench_setup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup.sh"


def run_setup(label: str, cache: Path, venv: Path, work: Path, env_extra: dict[str, str]) -> dict:
    """Run scripts/setup.sh once; its output goes to the console and to WORK/LABEL.log."""
    times = work / f"{label}.times.tsv"
    env = {**os.environ, "QUANTLOOP_CACHE": str(cache), "VENV": str(venv), "QUANTLOOP_SETUP_TIMES": str(times),
           **env_extra}
    log = work / f"{label}.log"
    print(f"\n== {label}: QUANTLOOP_CACHE={cache} VENV={venv}", flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(SETUP)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    steps = {}
    if times.is_file():  # absent when the set-up found everything up to date and exited at once
        for line in times.read_text().splitlines():
            name, _, s = line.partition("\t")
            steps[name] = int(s)
        times.unlink()
    if rc != 0:
        sys.exit(f"{label}: scripts/setup.sh exited {rc}; see {log}")
    return {"run": label, "wall_s": round(wall, 1), "steps_s": steps, "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "env": {k: v for k, v in env_extra.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warm-only", action="store_true", help="only a new venv on this machine's own cache")
    p.add_argument("--installer", choices=["uv", "pip"], default="uv", help="QUANTLOOP_INSTALLER for every run")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (caches, venvs, logs)")
    p.add_argument("--out", type=Path, default=ROOT / "SLM" / "reports" / "bench_setup.json")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="quantloop-bench-setup-"))
    base = {"QUANTLOOP_INSTALLER": a.installer}
    runs = []
    try:
        if a.warm_only:
            cache = Path(os.environ.get("QUANTLOOP_CACHE", Path.home() / ".cache" / "quantloop"))
            runs.append(run_setup("warm clone", cache, work / "venv", work, base))
            runs.append(run_setup("warm again", cache, work / "venv", work, base))
        else:
            cache = work / "cache"
            cold_env = {**base, "PIP_CACHE_DIR": str(work / "pip-cache"), "UV_CACHE_DIR": str(work / "uv-cache"),
                        "CCACHE_DIR": str(work / "ccache")}
            runs.append(run_setup("cold", cache, work / "venv", work, cold_env))
            warm_env = {**base, "PIP_CACHE_DIR": str(work / "pip-cache"), "UV_CACHE_DIR": str(work / "uv-cache")}
            runs.append(run_setup("warm clone", cache, work / "venv2", work, warm_env))
            runs.append(run_setup("warm again", cache, work / "venv2", work, warm_env))
    finally:
        if a.keep:
            print(f"\nkept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    names = []
    for r in runs:
        names += [n for n in r["steps_s"] if n not in names and n != "total"]
    print(f"\nset-up time by step (s), {os.cpu_count()} cores, installer {a.installer}:")
    header = f"{'step':<18}" + "".join(f"{r['run']:>12}" for r in runs)
    print(header)
    for n in names:
        print(f"{n:<18}" + "".join(f"{str(r['steps_s'].get(n, '-')):>12}" for r in runs))
    print(f"{'total (wall)':<18}" + "".join(f"{r['wall_s']:>12.1f}" for r in runs))
    print(f"{'load avg before':<18}" + "".join(f"{r['load_before'][0]:>12.2f}" for r in runs))
    notes = "llama.cpp build: in the background, beside the steps after the sources are unpacked"
    print(notes)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "cores": os.cpu_count(), "installer": a.installer, "runs": runs, "note": notes},
                              indent=2) + "\n")
    tmp.replace(a.out)
    print(f"report: {a.out}")


if __name__ == "__main__":
    main()
