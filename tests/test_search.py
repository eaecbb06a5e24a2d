"""The search end to end on the tiny prepared Llama: real optuna, real llama.cpp, a journal file."""

import json

import pytest

from tests.cli_helpers import assert_one_line_error


def _req(tiny, dataset_dir, out, **kw):
    from quantloop.search.schemas import SearchRequest, TextSpec

    t = lambda split: [TextSpec(dataset_dir=str(dataset_dir), split=split, chunks=1, seqlen=64)]  # noqa: E731
    base = dict(model=str(tiny), text=t("validation"), sensitivity_text=t("calibration"), test_text=t("test"),
                types=["Q4_0", "Q8_0"], granularity="group", budgets_bpw=[6.0], trials=5, population=4, out_dir=str(out),
                speed_tokens=8, speed_repeats=1, validate_front=2, study="t")
    return SearchRequest(**(base | kw))


@pytest.fixture(scope="module")
def searched(tiny_prepared, dataset_dir, tmp_path_factory):
    from quantloop.schemas import CalibrationSpec
    from quantloop.tools.search import search_mixed_precision

    out = tmp_path_factory.mktemp("search")
    req = _req(tiny_prepared, dataset_dir, out, tracking_uri=f"sqlite:///{out}/mlflow.db",
               imatrix=CalibrationSpec(dataset_dir=str(dataset_dir), samples=4, seqlen=64))
    return req, search_mixed_precision(req)


def test_search_returns_measured_front_with_maps(searched, tiny_prepared):
    from quantloop.search.precision_maps import read_map
    from quantloop.search.tensors import model_tensors
    from quantloop.models.checkpoints import resolve_model

    req, r = searched
    assert r.trials_complete >= 5 and r.trials_measured_here == r.trials_complete
    assert r.front, "an empty front"
    mt = model_tensors(resolve_model(tiny_prepared).gguf)
    for m in r.front:
        assert m.measured.bytes == m.measured.bytes_written  # the exact estimate is the written file
        assert m.measured.kld_mean > 0 and m.measured.tg_tokens_per_s > 0
        assert read_map(m.map_yaml, mt)[1] == m.measured.genome
    assert any(m.test_kld_mean is not None and m.test_kld_mean > 0 for m in r.front)
    # no member of the front is beaten on every objective by another
    for a in r.front:
        for b in r.front:
            x, y = a.measured, b.measured
            assert not (y.kld_mean < x.kld_mean and y.bytes < x.bytes and y.tg_tokens_per_s > x.tg_tokens_per_s)
    for png in (r.front_png, r.heatmap_png):
        assert open(png, "rb").read(4) == b"\x89PNG"
    assert json.loads(open(r.result_json).read())["trials_complete"] == r.trials_complete


def test_maps_carry_the_importance_matrix_the_candidates_used(searched, tmp_path):
    """Every written map quantizes with the search's importance matrix; the matrix changes a Q4_0 file's tensor data
    (llama.cpp's Q8_0 and the embedding, which has no matrix entry, ignore it) and adds quantize.imatrix.* keys to
    its header, which the exact size estimate counts."""
    import yaml

    from quantloop.gguf.llamacpp import read_metadata
    from quantloop.models.checkpoints import resolve_model
    from quantloop.schemas import quant_spec
    from quantloop.search.precision_maps import spec_fields
    from quantloop.search.tensors import genome_bytes, model_tensors
    from quantloop.tools.quantize import quantize_model
    from quantloop.tools.search import imatrix_extra_header

    req, r = searched
    for m in r.front:
        fields = yaml.safe_load(open(m.map_yaml).read())
        assert fields["imatrix"] is True and fields["calibration"] == req.imatrix.model_dump(mode="json"), fields
        assert m.measured.bytes == m.measured.bytes_written
    model = resolve_model(req.model)
    mt = model_tensors(model.gguf, ("Q4_0", "Q8_0", "F16"))
    genome = {t.name: ("Q4_0" if t.name.startswith("blk.") else "Q8_0") for t in mt.tensors}
    fields = spec_fields(genome, req.imatrix)
    with_im = quantize_model(req.model, tmp_path / "with", quant_spec(**fields))
    without = quantize_model(req.model, tmp_path / "without", quant_spec(**(fields | {"imatrix": False})))
    a, b = open(with_im.model_path, "rb").read(), open(without.model_path, "rb").read()
    extra = imatrix_extra_header(req.imatrix.model_dump(mode="json"), model)
    assert extra > 0 and len(a) == genome_bytes(mt, genome, extra) and len(b) == genome_bytes(mt, genome)
    oa, ob = read_metadata(with_im.model_path).data_offset, read_metadata(without.model_path).data_offset
    assert len(a) - oa == len(b) - ob and a[oa:] != b[ob:]
    assert b"quantize.imatrix.file" in a[:oa] and b"quantize.imatrix.file" not in b[:ob]


def test_seeds_are_the_baselines(searched):
    req, r = searched
    assert {a.method for a in r.baselines} == {"greedy", "ilp"}
    assert all(a.bytes <= a.budget_bytes for a in r.baselines)


def test_search_is_logged_to_mlflow(searched):
    from mlflow.tracking import MlflowClient

    req, r = searched
    c = MlflowClient(req.tracking_uri)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()], "tags.`quantloop.kind` = 'search-member'")
    assert len(runs) == len(r.front)


def test_trials_stay_near_the_seeds(searched):
    """The first generation is the seeds and small mutations of them (not uniform random maps), and no map above
    the size cap (the largest budget plus bpw_margin) is measured: the sampler's larger proposals are pruned."""
    import optuna

    from quantloop.search.study import CONFIG_ATTR, MUTANT_UNITS, open_storage, type_steps

    req, r = searched
    study = optuna.load_study(study_name="t", storage=open_storage(r.storage))
    config = json.loads(study.user_attrs[CONFIG_ATTR])
    cap = max(req.budgets_bpw) + req.bpw_margin
    assert config["max_bpw"] == pytest.approx(cap)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    seeds = [t.params for t in complete if t.user_attrs.get("origin", "").startswith(("greedy", "ilp"))]
    first = complete[: req.population]
    assert seeds and len(first) == req.population
    assert any(t.user_attrs.get("origin", "").startswith("mutant of ") for t in first)
    for t in first:
        assert t.user_attrs.get("origin", "").startswith(("greedy", "ilp", "mutant of ")), t.user_attrs
        assert min(type_steps(t.params, s, config["units"]) for s in seeds) <= MUTANT_UNITS
        # ... and is NSGA-II's generation 0, the parents of what it samples next
        assert [v for k, v in t.system_attrs.items() if k.endswith(":generation")] == [0]
    assert all(t.user_attrs["bits_per_weight"] <= cap for t in complete)
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all("measured" not in t.user_attrs and t.user_attrs["bits_per_weight"] > cap for t in pruned)


def test_resume_redoes_no_finished_trial(searched):
    import optuna

    from quantloop.search.study import open_storage
    from quantloop.tools.search import search_mixed_precision

    req, first = searched
    storage = open_storage(first.storage)
    before = {t.number: t.values for t in optuna.load_study(study_name="t", storage=storage).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))}
    again = search_mixed_precision(req.model_copy(update={"resume": True, "trials": first.trials_complete + 1, "tracking_uri": None}))
    after = {t.number: t.values for t in optuna.load_study(study_name="t", storage=open_storage(first.storage)).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))}
    assert all(after[n] == v for n, v in before.items())
    assert again.trials_measured_here == 1 and len(after) == len(before) + 1


def test_existing_study_without_resume_is_refused(searched, capsys):
    from quantloop.pipelines.search_command import main

    req, r = searched
    code = main(["search", req.model, "--text", str(req.text[0].dataset_dir), "--out", req.out_dir, "--study", "t",
                 "--types", "Q4_0,Q8_0", "--budgets", "6.0", "--seqlen", "64", "--chunks", "1", "--sens-chunks", "1"])
    assert_one_line_error(code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()], "already exists", "--resume")


@pytest.mark.parametrize("args,needles", [
    (["--budgets", "1.0"], ["below the smallest possible file"]),
    (["--target", "tpu-v9"], ["unknown target 'tpu-v9'", "arm-neon", "intel-vnni"]),
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], ["cannot open the optuna storage"]),
])
def test_bad_input_one_line(tiny_prepared, dataset_dir, tmp_path, capsys, args, needles):
    from quantloop.pipelines.search_command import main

    code = main(["search", str(tiny_prepared), "--text", str(dataset_dir), "--out", str(tmp_path / "o"), "--types", "Q4_0,Q8_0",
                 "--seqlen", "64", "--chunks", "1", "--sens-chunks", "1", "--trials", "1"] + args)
    assert_one_line_error(code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()], *needles)
    assert not list((tmp_path / "o").glob("maps/*")) and not (tmp_path / "o" / "search_result.json").exists()


def test_seed_map_naming_missing_tensor_is_one_line(tiny_prepared, dataset_dir, tmp_path, capsys):
    from quantloop.models.checkpoints import resolve_model
    from quantloop.pipelines.search_command import main
    from quantloop.search.precision_maps import write_map
    from quantloop.search.tensors import model_tensors

    mt = model_tensors(resolve_model(tiny_prepared).gguf)
    _, y = write_map({t.name: "Q8_0" for t in mt.tensors} | {"blk.7.ffn_up.weight": "Q4_0"}, tmp_path / "m")
    code = main(["search", str(tiny_prepared), "--text", str(dataset_dir), "--out", str(tmp_path / "o"), "--seed-map", str(y)])
    assert_one_line_error(code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()], "blk.7.ffn_up.weight", "does not have")
    assert not (tmp_path / "o" / "search.journal").exists() or (tmp_path / "o" / "search.journal").stat().st_size == 0


def test_policy_step_picks_lowest_kld_within_budget(searched):
    from quantloop.tools.search import best_precision_map_for_budget

    req, r = searched
    top = max(m.measured.bits_per_weight for m in r.front)
    pick = best_precision_map_for_budget(r.result_json, top)
    fits = [m for m in r.front if m.measured.bits_per_weight <= top]
    kld = lambda m: m.test_kld_mean if m.test_kld_mean is not None else m.measured.kld_mean  # noqa: E731
    assert pick is not None and kld(pick) == min(kld(m) for m in fits)
    assert best_precision_map_for_budget(r.result_json, 0.5) is None
    from quantloop.tools.search import spec_for_budget

    spec = spec_for_budget(r.result_json, top)
    assert spec.method == "gguf" and len(spec.gguf_tensor_types) == len(pick.measured.genome)
