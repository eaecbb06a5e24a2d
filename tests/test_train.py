"""`quantloop train-slm`: a micro Llama trained for a few steps, its checkpoints, resume, and bad input."""

import json
import shutil

import pytest
from cli_helpers import assert_one_line_error, run_cli  # noqa: E402

from quantloop.pipelines import train_slm as train
from quantloop.pipelines.cli import main

# One layer of width 32: a step takes a fraction of a second on 2 CPU cores (the 49152 x 32 embedding dominates).
MICRO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=128)
RUN = dict(size="micro", batch_size=4, seqlen=32, lr=1e-2, seed=0, eval_windows=8, progress=False)


@pytest.fixture(scope="module")
def micro_size():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(train.SIZES, "micro", MICRO)
        yield "micro"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro_size, reference_dir, dataset_dir):
    out = tmp_path_factory.mktemp("train") / "micro"
    manifest = train.train_slm(out, steps=12, save_every=6, dataset_dir=dataset_dir, tokenizer_dir=reference_dir, **RUN)
    return out, manifest




def test_checkpoints_and_manifest(trained):
    out, manifest = trained
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "step_12", "step_6", train.STATE_NAME, train.MANIFEST_NAME]
    for n in (6, 12):
        d = out / f"step_{n}"
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
        assert (d / f"micro-step_{n}-f16.gguf").is_file()
        m = json.loads((d / "quantloop_model.json").read_text())
        assert m["gguf_f16"] == f"micro-step_{n}-f16.gguf" and "train-slm" in m["reference_note"]
        config = json.loads((d / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype")) == "float32"
    on_disk = json.loads((out / train.MANIFEST_NAME).read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["size"] == "micro" and on_disk["config"]["hidden_size"] == 32 and on_disk["steps_requested"] == 12
    assert on_disk["config"]["vocab_size"] == 49152 and on_disk["config"]["tie_word_embeddings"]
    assert [c["step"] for c in on_disk["checkpoints"]] == [6, 12]
    assert 100 < on_disk["unigram_validation_ppl"] < 49152
    assert on_disk["optimizer_state"].endswith(train.STATE_NAME)
    first, last = on_disk["checkpoints"][0], on_disk["checkpoints"][-1]
    assert last["validation_loss"] < first["validation_loss"]
    assert last["validation_ppl"] == pytest.approx(2.718281828 ** last["validation_loss"], rel=1e-6)


def test_checkpoints_are_prepared_models(trained):
    from quantloop.agents.evaluation import find_checkpoints
    from quantloop.models.checkpoints import load_hf_model, resolve_model

    out, manifest = trained
    r = resolve_model(out / "step_12")
    assert r.hf_dir == out / "step_12" and r.gguf == out / "step_12" / "micro-step_12-f16.gguf"
    assert r.manifest is not None and r.manifest.architecture == "LlamaForCausalLM"
    assert r.manifest.n_params == manifest["n_params"]
    assert "train-slm" in r.reference_note
    model = load_hf_model(r.hf_dir)
    assert model.config.num_hidden_layers == 1
    assert find_checkpoints(out) == [out / "step_6", out / "step_12"]


def test_resume_adds_checkpoints_without_retraining(trained, tmp_path, reference_dir, dataset_dir):
    src, before = trained
    out = tmp_path / "micro"
    shutil.copytree(src, out)
    stamps = {n: (out / f"step_{n}" / "model.safetensors").stat().st_mtime_ns for n in (6, 12)}
    again = train.train_slm(out, steps=12, save_every=6, dataset_dir=dataset_dir, tokenizer_dir=reference_dir, **RUN)
    assert again["checkpoints"] == json.loads(json.dumps(before["checkpoints"]))  # nothing to do: nothing redone
    m = train.train_slm(out, steps=18, save_every=6, dataset_dir=dataset_dir, tokenizer_dir=reference_dir, **RUN)
    assert [c["step"] for c in m["checkpoints"]] == [6, 12, 18]
    assert m["checkpoints"][:2] == json.loads(json.dumps(before["checkpoints"]))
    assert m["steps_requested"] == 18
    for n, t in stamps.items():
        assert (out / f"step_{n}" / "model.safetensors").stat().st_mtime_ns == t
    assert (out / "step_18" / "micro-step_18-f16.gguf").is_file()
    assert m["checkpoints"][-1]["validation_loss"] < m["checkpoints"][0]["validation_loss"]
    from quantloop.agents.evaluation import find_checkpoints

    assert find_checkpoints(out) == [out / "step_6", out / "step_12", out / "step_18"]


def test_killed_run_is_repaired(trained, tmp_path, reference_dir, dataset_dir):
    """Killed after writing train_state.pt but before the manifest, with a step folder newer than the state."""
    src, before = trained
    out = tmp_path / "micro"
    shutil.copytree(src, out)
    m = json.loads((out / train.MANIFEST_NAME).read_text())
    m["checkpoints"] = m["checkpoints"][:1]
    (out / train.MANIFEST_NAME).write_text(json.dumps(m))
    shutil.copytree(out / "step_12", out / "step_15")
    again = train.train_slm(out, steps=12, save_every=6, dataset_dir=dataset_dir, tokenizer_dir=reference_dir, **RUN)
    assert [c["step"] for c in again["checkpoints"]] == [6, 12]
    assert json.loads((out / train.MANIFEST_NAME).read_text())["checkpoints"] == json.loads(json.dumps(before["checkpoints"]))
    assert not (out / "step_15").exists()


def test_cli_prints_the_table(capsys, trained, tmp_path, reference_dir, dataset_dir):
    src, before = trained
    out = tmp_path / "micro"
    shutil.copytree(src, out)
    code = main(["train-slm", "--size", "micro", "--steps", "12", "--out", str(out), "--batch-size", "4", "--seqlen", "32",
                 "--lr", "0.01", "--seed", "0", "--dataset", str(dataset_dir), "--tokenizer", str(reference_dir)])
    assert code == 0
    text = capsys.readouterr().out
    assert "validation ppl" in text and "unigram ppl" in text
    assert f"{before['checkpoints'][-1]['validation_ppl']:.2f}" in text and f"{before['unigram_validation_ppl']:.2f}" in text


def test_other_size_in_out_is_refused(capsys, trained, tmp_path):
    src, _ = trained
    out = tmp_path / "micro"
    shutil.copytree(src, out)
    before = sorted(p.name for p in out.rglob("*"))
    assert_one_line_error(*run_cli(capsys, "train-slm", "--size", "tiny", "--steps", 20, "--out", out), out, "size")
    assert sorted(p.name for p in out.rglob("*")) == before


def test_out_holding_another_model_is_refused(capsys, tmp_path, dataset_dir):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert_one_line_error(*run_cli(capsys, "train-slm", "--steps", 5, "--out", out), out, "another model")
    assert [p.name for p in out.iterdir()] == ["config.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    assert_one_line_error(*run_cli(capsys, "train-slm", "--steps", 5, "--out", other, "--overwrite"), other, "not empty")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("args, needle", [
    (["--size", "huge"], "no such size"),
    (["--steps", "0"], "--steps"),
    (["--save-every", "0"], "--save-every"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--seqlen", "4096"], "--seqlen"),
    (["--steps", "1000000"], "more than 50 times"),
    (["--batch-size", "4000"], "fewer than one batch"),
])
def test_bad_values(capsys, tmp_path, dataset_dir, reference_dir, args, needle):
    out = tmp_path / "new"
    argv = ["train-slm", "--steps", "5", "--out", out] + args
    assert_one_line_error(*run_cli(capsys, *argv), needle)
    assert not out.exists()


def test_every_option_help_states_its_real_default():
    """Each option of every command that has a default says it in its help, with the value the parser really uses."""
    import argparse

    from quantloop.pipelines.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, cmd in sub.choices.items():
        for action in cmd._actions:
            if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            text = action.help or ""
            if "default" not in text or (str(action.default) not in text and str(action.default) not in text.replace(",", "")):
                missing.append(f"{name} {action.option_strings[0]} (default {action.default!r}): {action.help}")
    assert not missing, "\n".join(missing)


def test_init_fine_tunes_a_prepared_model_into_a_second_checkpoint_of_its_family(trained, tmp_path, dataset_dir):
    """--init starts from the prepared model's weights: the fine-tune has its config and shapes (one family for the
    knowledge store), other weights (another digest), starts at the init's validation loss and is a prepared model."""
    import torch
    from safetensors.torch import load_file

    from quantloop.knowledge.identity import family_of, weights_digest
    from quantloop.models.checkpoints import resolve_model

    out, manifest = trained
    base = out / "step_12"
    tuned = train.train_slm(tmp_path / "ft", steps=2, init=base, dataset_dir=dataset_dir, batch_size=4, seqlen=32,
                            seed=1, eval_windows=8, progress=False)
    step = tmp_path / "ft" / "step_2"
    assert tuned["size"] == train.FINETUNE_SIZE and tuned["lr"] == train.FINETUNE_LR and tuned["init"] == str(base.resolve())
    base_cfg, ft_cfg = (json.loads((d / "config.json").read_text()) for d in (base, step))
    assert family_of(ft_cfg) == family_of(base_cfg)
    assert weights_digest(step) != weights_digest(base)
    a, b = load_file(base / "model.safetensors"), load_file(step / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < moved < 0.05  # two steps at 1e-4: moved, nowhere near a fresh start
    # the fine-tune begins where the base model is, not at a random model's loss
    assert abs(tuned["checkpoints"][0]["validation_loss"] - manifest["checkpoints"][-1]["validation_loss"]) < 0.5
    r = resolve_model(step)
    assert r.gguf is not None and r.hf_dir == step and "fine-tune of step_12" in r.reference_note
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_init_that_is_not_a_model_is_one_error_line(capsys, tmp_path, dataset_dir):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run_cli(capsys, "train-slm", "--steps", "2", "--out", tmp_path / "o", "--init",
                                   tmp_path / "empty", "--dataset", dataset_dir), "not a model")
    assert not (tmp_path / "o").exists()
