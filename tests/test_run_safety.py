"""Issue 33: safe run ids and names, one output folder per run with a content-addressed cache, the run id lock,
the shared summary under a lock, and the sweep of what killed runs leave behind (the kill harness itself is
test_fault_injection.py)."""

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_helpers import run_tiny, tiny_policy
from quantloop.errors import InputError
from quantloop.fileio import sha256_file, sweep_temporaries, tmp_prefix
from quantloop.locks import RunLock
from quantloop.names import check_name, check_run_id, under
from quantloop.pipelines.cli import main as cli_main
from quantloop.pipelines.summary import read_shared, update_shared
from quantloop.schemas import quant_spec
from quantloop.tools.quantize import quantize_model

ROOT = Path(__file__).resolve().parent.parent
Q8 = {"name": "int8-q8_0", "spec": {"method": "gguf", "bits": 8, "gguf_type": "Q8_0"}}

GOOD = ["r1", "20250101-120000-ab12cd", "my-run.2", "A_b-c.d", "x" * 64, "0"]
BAD = ["", ".", "..", "../x", "../../../../outside", "/abs/path", "a/b", "a\\b", "x" * 65, "héllo", "ラン", "run id",
       "-x", ".hidden", "_x", "a\x00b", "a\nb", "~", "x/..", "*"]


@pytest.mark.parametrize("run_id", GOOD)
def test_safe_run_ids_pass(run_id):
    assert check_run_id(run_id) == run_id


@pytest.mark.parametrize("run_id", BAD)
def test_unsafe_run_ids_are_refused_in_one_line(run_id):
    with pytest.raises(InputError, match="is not a safe name") as e:
        check_run_id(run_id)
    assert "\n" not in e.value.line().replace(repr(run_id), "") and "run id" in e.value.line()


@pytest.mark.parametrize("argv", [["run", "--run-id", "../../../../outside"], ["run", "--run-id", "/tmp/x"], ["report", "../x"],
                                  ["prepare", "--name", "../evil"], ["prepare", "--dataset", ".."], ["run", "--run-id", "é"]])
def test_the_cli_refuses_before_any_work(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("quantloop: error: ") and "is not a safe name" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_python_api_refuses_the_same_ids(tmp_path):
    from quantloop.pipelines.run import run_pipeline
    from quantloop.report import write_run_report

    with pytest.raises(InputError, match="run id '../x' is not a safe name"):
        run_pipeline(tmp_path / "nowhere", run_id="../x", output_root=tmp_path, state_db=tmp_path / "s.sqlite")
    with pytest.raises(InputError, match="is not a safe name"):
        write_run_report("/etc/passwd", f"sqlite:///{tmp_path}/m.db")
    assert list(tmp_path.iterdir()) == []


def test_paths_built_from_names_stay_under_their_root(tmp_path):
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path)  # a link that leads out
    assert under(root, "ok", "r1") == (root / "ok" / "r1").resolve()
    for parts in (("..", "x"), ("escape", "x"), ("/etc",)):
        with pytest.raises(InputError, match="lies outside its folder"):
            under(root, *parts)
    with pytest.raises(InputError, match="model name"):
        check_name("../m", "model name")


def test_prepare_and_dataset_names_are_checked(tmp_path):
    from quantloop.data.datasets import named_dataset_dir, prepare_text
    from quantloop.models.checkpoints import prepare_model

    with pytest.raises(InputError, match="model name '../x' is not a safe name"):
        prepare_model(None, "../x", tmp_path)
    with pytest.raises(InputError, match="dataset name '..' is not a safe name"):
        prepare_text(None, "..", tmp_path)
    with pytest.raises(InputError, match="dataset name"):
        named_dataset_dir("..")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- a live run's id, shared files, temporaries


def test_a_second_run_with_the_id_of_a_live_run_is_refused(tiny_prepared, dataset_dir, tmp_path):
    policy = tiny_policy(tmp_path, [Q8], measure_speed=False)
    with RunLock(tmp_path / "locks", "live-run"):  # the live run: this process holds its lock
        with pytest.raises(InputError, match=rf"run id 'live-run' is in use by a live run \(process {os.getpid()};"):
            run_tiny(tmp_path, tiny_prepared, dataset_dir, policy, run_id="live-run")
    assert not (tmp_path / "quantized").exists()  # refused before any work
    # a lock whose holder died is free at once (the kernel dropped it): a child takes and keeps it until it exits
    code = "import sys; from quantloop.locks import RunLock; RunLock(sys.argv[1], 'dead-run').acquire(); print('held')"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "locks")], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout == "held\n", done.stderr
    RunLock(tmp_path / "locks", "dead-run").acquire().release()


def _write_rows(path: str, model: str, n: int) -> None:
    for i in range(n):
        update_shared(Path(path), model, {"run_id": f"{model}-{i}", "decision": "accepted", "attempts": [{"index": 0}]},
                      Path(f"/runs/{model}-{i}.json"))


def test_concurrent_summary_writers_lose_no_rows(tmp_path):
    path = tmp_path / "quantization_summary.json"
    path.write_text(json.dumps({"run_id": "old", "model": "/m/legacy", "decision": "rejected", "attempts": []}))  # the old form
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_rows, args=(str(path), m, 15)) for m in ("model-a", "model-b", "model-a")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    data = read_shared(path)
    assert set(data["models"]) == {"legacy", "model-a", "model-b"}
    assert data["models"]["legacy"]["latest"]["run_id"] == "old"  # an earlier run's summary is kept
    assert len(data["models"]["model-b"]["runs"]) == 15 and data["models"]["model-b"]["latest"]["run_id"] == "model-b-14"
    assert {r["run_id"] for r in data["models"]["model-a"]["runs"]} == {f"model-a-{i}" for i in range(15)}
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_only_temporaries_of_dead_writers_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "a").mkdir()
    orphan = tmp_path / "a" / f".x.gguf.tmp-{dead}-abc"
    orphan.mkdir()
    (orphan / "x.gguf").write_bytes(b"half")
    mine = tmp_path / "a" / f"{tmp_prefix('y.json')}def"
    mine.write_text("{")
    old_form = tmp_path / ".z.json.tmp-abcdef"
    old_form.write_text("{")
    os.utime(old_form, (1, 1))
    assert set(sweep_temporaries(tmp_path, started_before=100)) == {orphan, old_form}
    assert mine.exists() and (tmp_path / "a").is_dir()


# ------------------------------------------------------------------------- one folder per run, the cache


def test_identical_work_is_reused_from_the_cache(tiny_prepared, tmp_path):
    spec = quant_spec(method="gguf", bits=8, gguf_type="Q8_0")
    first = quantize_model(tiny_prepared, tmp_path / "a", spec, cache_dir=tmp_path / "cache")
    second = quantize_model(tiny_prepared, tmp_path / "b", spec, cache_dir=tmp_path / "cache")
    a, b = Path(first.model_path), Path(second.model_path)
    assert a.parent == tmp_path / "a" and b.parent == tmp_path / "b" and a.name == b.name
    assert sha256_file(a) == sha256_file(b) and second.bytes_on_disk == first.bytes_on_disk
    assert not any("reused" in n for n in first.notes) and "reused the files of an identical earlier quantization" in second.notes[-1]
    assert json.loads((tmp_path / "b" / "quantization_config.json").read_text())["quantloop"]["output_dir"] == str(tmp_path / "b")
    other = quantize_model(tiny_prepared, tmp_path / "c", quant_spec(method="gguf", bits=4, gguf_type="Q4_0"), cache_dir=tmp_path / "cache")
    assert not any("reused" in n for n in other.notes)  # another spec: another key
    assert len([p for p in (tmp_path / "cache").iterdir()]) == 2


def test_a_second_run_never_replaces_the_first_runs_files(tiny_prepared, dataset_dir, tmp_path):
    policy = tiny_policy(tmp_path, [Q8], measure_speed=False, max_ppl_pct=50.0)
    # without the knowledge store, which would skip the step the first run failed (speed not measured here)
    one = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy, run_id="first", memory=False)
    files = {p: (p.stat().st_mtime_ns, sha256_file(p)) for p in Path(one.attempts[0].output_dir).iterdir()}
    two = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy, run_id="second", memory=False)
    out1, out2 = Path(one.attempts[0].output_dir), Path(two.attempts[0].output_dir)
    assert out1 == tmp_path / "quantized" / "tiny" / "first" / "0-tiny_gguf-q8_0"
    assert out2 == tmp_path / "quantized" / "tiny" / "second" / "0-tiny_gguf-q8_0"
    assert {p: (p.stat().st_mtime_ns, sha256_file(p)) for p in out1.iterdir()} == files  # untouched
    assert "reused the files of an identical earlier quantization" in two.attempts[0].quantization.notes[-1]
    assert one.decision == two.decision
    own = json.loads(Path(one.summary_path).read_text())
    assert Path(one.summary_path) == out1.parent / "quantization_summary.json" and own["run_id"] == "first"
    shared = json.loads((tmp_path / "quantized" / "quantization_summary.json").read_text())
    assert shared["models"]["tiny"]["latest"]["run_id"] == "second"
    assert [r["run_id"] for r in shared["models"]["tiny"]["runs"]] == ["first", "second"]
    assert list(shared["models"]["tiny"]["latest"]["attempts"][0]) == list(own["attempts"][0])  # the same row fields
