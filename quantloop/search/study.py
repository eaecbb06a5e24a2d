"""The optuna study behind `quantloop search`: its storage (a journal file on one host, or an RDB URL such as
postgresql://... that workers on several machines share), the genome as optuna parameters, seeds, workers
and the measured Pareto front.

A worker that dies mid-trial loses nothing finished: every finished trial is already in the storage, and the
storage's heartbeat marks the dead worker's running trial failed after the grace period; a retry callback then
queues a copy of it, which the next free worker runs.

Where the trials go: the first generation is the seeds (greedy / ILP maps at the budgets) and, up to the
population, small mutations of them (a few units one type up or down, within the size cap), not optuna's uniform
random maps; NSGA-II then breeds from those. Candidates above the size cap (`max_bpw`, by default the largest
seed budget plus `bpw_margin`) are pruned before anything is quantized, and only measured (complete) trials count
toward the number of trials.
"""

from __future__ import annotations

import inspect
import json
import random
import time
import warnings
from pathlib import Path

from quantloop.errors import InputError, missing_extra
from quantloop.models.checkpoints import resolve_model
from quantloop.search.tensors import genome_bits_per_weight, model_tensors

DIRECTIONS = ["minimize", "minimize", "maximize"]  # mean KLD, file bytes, tg tokens/s
OBJECTIVES = ["kld_mean", "bytes", "tg_tokens_per_s"]
HEARTBEAT_S = 2
GRACE_S = 6
CONFIG_ATTR = "quantloop_request"
FILLED_ATTR = "quantloop_first_generation"
MUTANT_UNITS = 3  # a first-generation mutant moves 1 to this many units one type up or down
PRUNED_PER_TRIAL = 20  # a worker gives up after this many pruned proposals per trial it still has to measure


def _retry_callback():
    import optuna  # deferred: optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    return cls(max_retry=3)


def _rdb(url: str, heartbeat: bool):
    import optuna  # deferred: optuna

    kwargs = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S} if heartbeat else {}
    if heartbeat:
        key = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
               else "failed_trial_callback")
        kwargs[key] = _retry_callback()
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)


def open_storage(url: str, heartbeat: bool = True):
    """An optuna storage from a URL (postgresql://, mysql://, sqlite:///) or a journal file path. A storage that
    cannot be opened is an InputError naming it."""
    import optuna  # deferred: optuna

    if "://" in url:
        safe = url.split("@")[-1] if "@" in url else url
        try:
            return _rdb(url, heartbeat)
        except Exception as e:  # sqlalchemy / driver errors: bad host, no server, refused, bad credentials
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise missing_extra(e) or InputError(None, f"cannot open the optuna storage '{safe}': {msg}",
                             "check that the server runs and the URL (user, host, port, database) is right") from None
    path = Path(url)
    if path.is_dir() or not path.parent.is_dir():
        raise InputError(path, "cannot open as an optuna journal file", "give a file path in an existing folder")
    from optuna.storages.journal import JournalFileBackend  # deferred: optuna

    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except Exception as e:
        raise InputError(path, f"cannot open as an optuna journal file ({str(e)[:120]})", "give a writable file path") from None


def study_exists(storage, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())


def make_sampler(kind: str, population: int, seed: int):
    import optuna  # deferred: optuna

    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)

    class SeededNSGAIISampler(optuna.samplers.NSGAIISampler):
        """NSGA-II whose queued maps (the seeds, their mutants) join the generation being filled. optuna gives a
        trial its generation when the trial samples a parameter, which a trial with every parameter fixed never
        does: without this the seeds are never parents and the first generation is `population` random maps."""

        def before_trial(self, study, trial):
            if "fixed_params" in trial.system_attrs:
                self.get_trial_generation(study, trial)
            super().before_trial(study, trial)

    return SeededNSGAIISampler(population_size=population, seed=seed)


def create_study(storage, name: str, config: dict, resume: bool):
    """Create the study (and store the request in it), or load it with resume=True."""
    import optuna  # deferred: optuna

    exists = study_exists(storage, name)
    if exists and not resume:
        raise InputError(None, f"a search named '{name}' already exists in this storage", "pass --resume to continue it or choose another --study")
    if not exists and resume:
        raise InputError(None, f"no search named '{name}' in this storage to resume", "drop --resume to start it")
    sampler = make_sampler(config["sampler"], config["population"], config["seed"])
    if config.get("max_bpw") is None and config.get("bpw_margin") is not None and config.get("budgets_bpw"):
        config = config | {"max_bpw": round(max(config["budgets_bpw"]) + config["bpw_margin"], 4)}
    if exists:  # the stored settings stand; only the number of trials may grow
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        stored = json.loads(study.user_attrs[CONFIG_ATTR])
        stored["trials"] = config["trials"]
        study.set_user_attr(CONFIG_ATTR, json.dumps(stored))
        return study, False
    study = optuna.create_study(study_name=name, storage=storage, directions=DIRECTIONS, sampler=sampler)
    study.set_user_attr(CONFIG_ATTR, json.dumps(config))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(OBJECTIVES)
    return study, True


def load_study(storage, name: str):
    import optuna  # deferred: optuna

    if not study_exists(storage, name):
        raise InputError(None, f"no search named '{name}' in this storage", "start it with `quantloop search` first")
    study = optuna.load_study(study_name=name, storage=storage)
    config = json.loads(study.user_attrs[CONFIG_ATTR])
    study.sampler = make_sampler(config["sampler"], config["population"], config["seed"])
    fill_first_generation(study, config)
    return study, config


def type_steps(a: dict[str, str], b: dict[str, str], units: dict) -> int:
    """How many type steps (in each unit's smallest-first list of types) apart two choices (param -> type) are."""
    return sum(abs(list(ty).index(a[param_name(u)]) - list(ty).index(b[param_name(u)])) for u, (_, ty) in units.items())


def fill_first_generation(study, config: dict, mt=None) -> list[dict[str, str]]:
    """Once, before any trial ran: queue mutations of the queued seeds until the first generation (the population)
    is full, so that it is the seeds and their neighbours instead of uniform random maps. A mutant moves 1 to
    MUTANT_UNITS units one type up or down; mutants above max_bpw, or equal to a queued map, are not queued."""
    import optuna  # deferred: optuna

    trials = study.get_trials(deepcopy=False)
    if study.user_attrs.get(FILLED_ATTR) or any(t.state != optuna.trial.TrialState.WAITING for t in trials):
        return []
    study.set_user_attr(FILLED_ATTR, True)
    seeds = [(t.system_attrs["fixed_params"], t.user_attrs.get("origin", "seed")) for t in trials if "fixed_params" in t.system_attrs]
    units = {u: (ts, tuple(ty)) for u, (ts, ty) in config["units"].items()}
    movable = [u for u, (_, ty) in units.items() if len(ty) > 1]
    if not seeds or not movable:
        return []
    if mt is None and config.get("max_bpw"):
        mt = model_tensors(resolve_model(config["model"]).gguf, tuple(config["types"]) + ("F16",))
    rng, queued, out = random.Random(config["seed"]), [p for p, _ in seeds], []
    for i in range(50 * config["population"]):
        if len(seeds) + len(out) >= config["population"]:
            break
        params, origin = seeds[i % len(seeds)]
        child = dict(params)
        for u in rng.sample(movable, min(len(movable), rng.randint(1, MUTANT_UNITS))):
            ty = units[u][1]
            j = ty.index(child[param_name(u)]) + rng.choice((-1, 1))
            child[param_name(u)] = ty[min(max(j, 0), len(ty) - 1)]
        if child in queued or (mt is not None and config.get("max_bpw") and _bpw(mt, child, units) > config["max_bpw"]):
            continue
        study.enqueue_trial(child, user_attrs={"origin": f"mutant of {origin}"}, skip_if_exists=True)
        queued.append(child)
        out.append(child)
    return out


def _bpw(mt, params: dict[str, str], units) -> float:
    return genome_bits_per_weight(mt, {n: params[param_name(u)] for u, (ts, _) in units.items() for n in ts})


def param_name(unit: str) -> str:
    return f"type:{unit}"


def suggest_genome(trial, units: dict[str, tuple[list[str], tuple[str, ...]]]) -> dict[str, str]:
    """units: unit -> (its tensors, the types it can take). One categorical parameter per unit."""
    genome = {}
    for unit, (tensors, types) in units.items():
        t = trial.suggest_categorical(param_name(unit), list(types))
        genome.update({n: t for n in tensors})
    return genome


def enqueue_seed(study, choice: dict[str, str], origin: str) -> None:
    """A known precision map (unit -> type) as the next trial; its origin is kept with the trial."""
    study.enqueue_trial({param_name(u): t for u, t in choice.items()}, user_attrs={"origin": origin}, skip_if_exists=True)


def finished(study) -> list:
    import optuna  # deferred: optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


def run_trials(study, objective, total: int) -> int:
    """Run trials until the study holds `total` measured (complete) trials; pruned proposals (above the size cap)
    cost no measurement and do not count, up to PRUNED_PER_TRIAL of them per trial still to run. Returns how many
    trials ran here."""
    import optuna  # deferred: optuna
    from optuna.study import MaxTrialsCallback  # deferred: optuna

    states = (optuna.trial.TrialState.COMPLETE,)
    done_before = len(study.get_trials(deepcopy=False, states=states))
    if done_before >= total:
        return 0
    ran = []

    def count(study, trial):
        if trial.state == optuna.trial.TrialState.COMPLETE:
            ran.append(trial.number)

    study.optimize(objective, n_trials=PRUNED_PER_TRIAL * (total - done_before), catch=(RuntimeError,), gc_after_trial=True,
                   callbacks=[MaxTrialsCallback(total, states=states), count])
    rerun_orphans(study, objective, count)
    return len(ran)


def rerun_orphans(study, objective, count) -> None:
    """With a heartbeat storage: once the study is full, wait out the grace period of any trial still running,
    fail the ones whose worker died (the retry callback queues a copy of each) and run those copies here."""
    import optuna  # deferred: optuna
    from optuna.storages import fail_stale_trials  # deferred: optuna

    storage = study._storage
    if not getattr(storage, "heartbeat_interval", None):
        return
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        return
    time.sleep(GRACE_S + HEARTBEAT_S)
    fail_stale_trials(study)
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    if waiting:
        study.optimize(objective, n_trials=len(waiting), callbacks=[count], catch=(RuntimeError,), gc_after_trial=True)


def pareto_front(study) -> list:
    """The measured Pareto front over (KLD, bytes, tg speed) of the complete trials, fewest bytes first."""
    return sorted(study.best_trials, key=lambda t: (t.values[1], t.values[0]))


def front_2d(trials) -> list:
    """The trials no other trial beats on both KLD and bytes (speed left out), fewest bytes first."""
    out, best = [], float("inf")
    for t in sorted(trials, key=lambda t: (t.values[1], t.values[0])):
        if t.values[0] < best:
            out.append(t)
            best = t.values[0]
    return out
