"""A fallback policy for the tiny model and a pipeline run on it with its own MLflow store and state database
(shared by the pipeline and policy tests)."""

from pathlib import Path

import yaml

from spec_helpers import tiny_acceptance


def tiny_policy(tmp_path: Path, steps: list[dict], measure_speed: bool = True, **acceptance) -> Path:
    """policy.yaml with `steps` on the cpu target, beside an acceptance.yaml (tiny_acceptance(**acceptance))."""
    tiny_acceptance(tmp_path / "acceptance.yaml", **acceptance)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({
        "target": "cpu", "acceptance_spec": "acceptance.yaml",
        "validation": {"chunks": 2, "measure_speed": measure_speed, "selection_chunks": 1},
        "steps": {"cpu": steps},
    }))
    return path


def run_tiny(tmp_path, model, dataset_dir, policy, run_id="r1", **kw):
    """run_pipeline with every output (quantized models, MLflow store, state database) under tmp_path."""
    from quantloop.pipelines.run import run_pipeline

    return run_pipeline(model, policy, run_id=run_id, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", dataset_dir=dataset_dir,
                        output_root=tmp_path / "quantized", state_db=tmp_path / "state.sqlite", **kw)
