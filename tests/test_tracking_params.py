"""An attempt's spec as MLflow parameters: a per-tensor precision map (regular expressions as keys, hundreds of
entries) is logged by a real MLflow store, not refused."""

import json


def test_a_per_tensor_map_is_logged_as_one_parameter(tmp_path):
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from quantloop.schemas import quant_spec
    from quantloop.tracking import flatten

    rules = {f"^blk\\.{i}\\.ffn_down\\.weight$": "Q3_K" if i < 2 else "IQ4_NL" for i in range(300)}
    spec = quant_spec(method="gptq", gguf_type="IQ4_NL", gguf_tensor_types=rules, layer_types={"norms": "F32"})
    params = {f"spec.{k}": str(v) for k, v in flatten(spec.model_dump(mode="json")).items()}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("x"))
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    logged = client.get_run(run.info.run_id).data.params
    summary = json.loads(logged["spec.gguf_tensor_types"])
    assert summary["entries"] == 300 and summary["values"] == {"IQ4_NL": 298, "Q3_K": 2}
    assert logged["spec.layer_types.norms"] == "F32" and logged["spec.method"] == "gptq"


def test_a_qat_attempt_names_its_calibration(tmp_path):
    """Every method whose backend needs calibration data logs where it came from (QAT trains on calibration
    sequences; its parameters once said 'none')."""
    from quantloop.agents.state import Attempt
    from quantloop.schemas import CalibrationSpec, QuantizationResult, quant_spec
    from quantloop.tracking import Tracker

    def logged(spec):
        result = QuantizationResult(spec=spec, output_dir=str(tmp_path), model_path=str(tmp_path / "m.gguf"), format="gguf:Q4_0",
                                    wall_s=1.0, peak_rss_bytes=1, bytes_on_disk=1, bits_per_weight=4.5,
                                    linear_bits_per_weight=4.5, libraries={}, calibration_manifest_sha256="abc")
        attempt = Attempt(index=len(runs), step=f"s{len(runs)}", kind="qat" if spec.method == "qat" else "quantize",
                          method=spec.method, bits=spec.bits, checkpoint="ckpt", output_dir=None, status="quantized",
                          quantization=result)
        rid = tracker.log_attempt(parent, "run-1", attempt, log_model_max_mib=0)
        runs.append(rid)
        return tracker.client.get_run(rid).data.params

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    parent = tracker.parent_run("run-1", {})
    runs: list[str] = []
    cal = CalibrationSpec(dataset_dir="shakespeare", samples=8, seqlen=32)
    qat = logged(quant_spec(method="qat", gguf_type="Q4_0", calibration=cal))
    assert qat["calibration.source"] == "dataset:shakespeare:calibration" and qat["calibration.size"] == "8x32 tokens"
    imatrix = logged(quant_spec(method="gguf", gguf_type="Q4_K_M", imatrix=True, calibration=cal))
    assert imatrix["calibration.source"] == "dataset:shakespeare:calibration"
    plain = logged(quant_spec(method="gguf", gguf_type="Q8_0", calibration=cal))
    assert plain["calibration.source"] == "none" and plain["calibration.size"] == "0"
