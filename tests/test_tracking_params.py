"""An attempt's spec as MLflow parameters: a per-tensor precision map (regular expressions as keys, hundreds of
entries) is logged by a real MLflow store, not refused."""

import json


def test_a_per_tensor_map_is_logged_as_one_parameter(tmp_path):
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from quantloop.schemas import QuantSpec
    from quantloop.tracking import flatten

    rules = {f"^blk\\.{i}\\.ffn_down\\.weight$": "Q3_K" if i < 2 else "IQ4_NL" for i in range(300)}
    spec = QuantSpec(method="gptq", gguf_type="IQ4_NL", gguf_tensor_types=rules, layer_types={"norms": "F32"})
    params = {f"spec.{k}": str(v) for k, v in flatten(spec.model_dump(mode="json")).items()}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("x"))
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    logged = client.get_run(run.info.run_id).data.params
    summary = json.loads(logged["spec.gguf_tensor_types"])
    assert summary["entries"] == 300 and summary["values"] == {"IQ4_NL": 298, "Q3_K": 2}
    assert logged["spec.layer_types.norms"] == "F32" and logged["spec.method"] == "gptq"
