"""Scale-out on PostgreSQL: a real server (Debian's postgresql, started here on 127.0.0.1 in a temporary folder,
as an unprivileged user when the tests run as root), two `search-worker` processes on one study, one of them
killed mid-trial. No finished trial is lost, and the killed worker's trial is run again by the other one."""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest


def _pg_bin() -> str | None:
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return dirs[-1] if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed: run scripts/setup-postgres.sh")
    as_user = []
    root = tempfile.mkdtemp(prefix="quantloop-pg-")
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres (or nobody) user
        import pwd

        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        pw = pwd.getpwnam(user)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", user, "--"]
    data, port = os.path.join(root, "data"), _free_port()
    run = lambda *cmd: subprocess.run(as_user + list(cmd), check=True, capture_output=True, text=True)  # noqa: E731
    run(f"{bin_dir}/initdb", "-D", data, "-U", "quantloop", "-A", "trust", "--no-sync")
    run(f"{bin_dir}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-o",
        f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off", "start")
    try:
        run(f"{bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "quantloop", "search")
        yield f"postgresql+psycopg2://quantloop@127.0.0.1:{port}/search"
    finally:
        subprocess.run(as_user + [f"{bin_dir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _trials(url, state):
    import optuna

    from quantloop.search.study import open_storage

    storage = open_storage(url, heartbeat=False)
    try:  # polled every 0.2 s: each poll's connections are closed, or a slow run exhausts the server's max_connections
        return optuna.load_study(study_name="pg", storage=storage).get_trials(states=(getattr(optuna.trial.TrialState, state),))
    finally:
        storage.engine.dispose()


def test_two_workers_on_postgres_and_a_killed_worker_loses_nothing(postgres_url, tiny_prepared, dataset_dir, tmp_path):
    from quantloop.search.schemas import SearchRequest, TextSpec
    from quantloop.tools.search import search_mixed_precision

    t = lambda split: [TextSpec(dataset_dir=str(dataset_dir), split=split, chunks=1, seqlen=64)]  # noqa: E731
    req = SearchRequest(model=str(tiny_prepared), text=t("validation"), sensitivity_text=t("calibration"), test_text=t("test"),
                        types=["Q4_0", "Q5_0", "Q8_0"], granularity="group", budgets_bpw=[6.0, 7.0], trials=10, population=4,
                        out_dir=str(tmp_path), storage=postgres_url, study="pg", workers=0, speed_tokens=8, speed_repeats=1,
                        validate_front=1)
    created = search_mixed_precision(req)  # sensitivity, seeds, the study in PostgreSQL; no trial yet
    assert created.trials_complete == 0
    cmd = [sys.executable, "-m", "quantloop.pipelines.search_command", "search-worker", "--storage", postgres_url, "--study", "pg"]
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_trial, done_at_kill = None, {}
    deadline = time.time() + 300
    while time.time() < deadline and killed_trial is None:
        done = _trials(postgres_url, "COMPLETE")
        mine = [x for x in _trials(postgres_url, "RUNNING") if x.user_attrs.get("worker", "").endswith(f":{a.pid}")]
        if len(done) >= 2 and mine:
            os.kill(a.pid, signal.SIGKILL)
            killed_trial, done_at_kill = mine[0].number, {x.number: x.values for x in done}
        time.sleep(0.2)
    assert killed_trial is not None, "worker A never ran a trial while two were complete"
    a.wait()
    out_b, _ = b.communicate(timeout=600)
    assert b.returncode == 0, out_b[-2000:]
    complete = {x.number: x for x in _trials(postgres_url, "COMPLETE")}
    failed = {x.number for x in _trials(postgres_url, "FAIL")}
    # every trial finished before the kill is still there, with the same measurements
    assert all(complete[n].values == v for n, v in done_at_kill.items())
    assert killed_trial in failed  # the heartbeat marked the dead worker's trial failed ...
    retried = [x for x in complete.values() if x.system_attrs.get("failed_trial") == killed_trial]
    assert retried, "... and a copy of it was run to completion"
    assert len(complete) >= req.trials
    workers = {x.user_attrs["worker"].split(":")[1] for x in complete.values()}
    assert str(a.pid) in workers and str(b.pid) in workers  # both workers finished trials
    report = search_mixed_precision(req.model_copy(update={"resume": True}))  # report only: nothing is measured again
    assert report.trials_measured_here == 0 and report.front
    print(f"\nPostgreSQL two-worker search: {len(complete)} complete trials "
          f"(worker A pid {a.pid}: {sum(x.user_attrs['worker'].endswith(f':{a.pid}') for x in complete.values())}, "
          f"worker B pid {b.pid}: {sum(x.user_attrs['worker'].endswith(f':{b.pid}') for x in complete.values())}); "
          f"A killed (SIGKILL) in trial {killed_trial} with {len(done_at_kill)} complete; trial {killed_trial} -> FAIL by heartbeat, "
          f"re-run as trial {retried[0].number} by B; all {len(done_at_kill)} earlier trials unchanged; "
          f"front of {len(report.front)} from the stored trials, 0 re-measured")
    print(out_b.strip().splitlines()[-1])
