"""A finished `quantloop run` on the tiny model with its MLflow store, and the headless Chromium that reviews it
(shared by the run report and MLflow UI tests; the `finished_run` fixture in conftest.py makes the run)."""

import contextlib
from pathlib import Path

import yaml

RUN_ID = "report-run"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync", "--disable-quic"]


@contextlib.contextmanager
def open_browser(profile: Path):
    """Debian's headless Chromium (scripts/setup-browser.sh installs it) with a fresh profile, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: run scripts/setup-browser.sh"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
                                                       viewport={"width": 1280, "height": 1000})
        try:
            yield context
        finally:
            context.close()


def write_policy(folder: Path, held_out: Path | None = None) -> Path:
    """Q4_0 fails a 0.1 % perplexity bar (and a 5x size bar) on the tiny model; an RTN step exported to Q4_0 is skipped
    before quantizing (its file size is known to miss the size bar); Q8_0 passes. `held_out`: a dataset judged too."""
    (folder / "acceptance.yaml").write_text(yaml.safe_dump({
        "acceptance": {"max_ppl_increase_pct": 0.1, "min_speedup": 1e-6, "min_size_ratio": {4: 5.0, 8: 1.0},
                       "no_generation_failures": False},
        "eval": {"context": 64, "chunks": 2},
        "speed": {"prompt_tokens": 8, "gen_tokens": 4, "repeats": 1},
        "generation": {"prompts": ["Hello there", "The king said"], "max_new_tokens": 6, "min_new_tokens": 1},
    }))
    policy = folder / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "target": "cpu", "acceptance_spec": "acceptance.yaml",
        "validation": {"chunks": 2, "measure_speed": True, "selection_chunks": 1, "held_out": [str(held_out)] if held_out else []},
        "steps": {"cpu": [{"name": "int4-q4_0", "spec": {"method": "gguf", "bits": 4, "gguf_type": "Q4_0"}},
                          {"name": "int4-rtn-q4_0", "spec": {"method": "rtn", "bits": 4, "group_size": 32, "gguf_type": "Q4_0"}},
                          {"name": "int8-q8_0", "spec": {"method": "gguf", "bits": 8, "gguf_type": "Q8_0"}}]},
    }))
    return policy


def finished_run_folder(base: Path, tiny_prepared: Path, dataset_dir: Path) -> Path:
    """A finished `quantloop run` on the tiny model (three attempts, the last accepted) with its MLflow store, made once
    per test session (the folder is shared by every test module that asks for it)."""
    folder = base / "finished-run"
    if (folder / "done").is_file():
        return folder
    from quantloop.pipelines.run import run_pipeline

    folder.mkdir(parents=True, exist_ok=True)
    state = run_pipeline(tiny_prepared, write_policy(folder, held_out=dataset_dir), run_id=RUN_ID, tracking_uri=tracking_uri(folder),
                         dataset_dir=dataset_dir, output_root=folder / "quantized", state_db=folder / "state.sqlite")
    assert state.decision == "accepted" and len(state.attempts) == 3
    (folder / "done").write_text("ok\n")
    return folder


def tracking_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"
