"""The policy step of kind search: its validation, the QuantizationAgent quantizing to the front member it picks
from a finished search (the GGUF holds exactly that member's tensor types), a budget no member fits (skipped
with the reason), a short search run when there is no result file, and `quantloop search --bpw-margin`."""

from pathlib import Path

import pytest
import yaml

from pipeline_helpers import run_tiny, tiny_policy
from quantloop.agents.policy import load_policy
from quantloop.errors import InputError

SEARCH_STEP = {"name": "searched", "kind": "search"}
Q8_STEP = {"name": "int8", "spec": {"method": "gguf", "bits": 8, "gguf_type": "Q8_0"}}


# ------------------------------------------------------------------------- validation (no model needed)


@pytest.mark.parametrize("step,needle", [
    (SEARCH_STEP, "step 'searched' of kind search needs a 'search'"),
    ({**SEARCH_STEP, "search": {"max_bpw": 5.0}, "spec": Q8_STEP["spec"]}, "step 'searched' of kind search takes no 'spec'"),
    ({**Q8_STEP, "search": {"max_bpw": 5.0}}, "step 'int8' of kind quantize takes no 'search'"),
])
def test_a_search_step_needs_search_and_no_spec_and_only_it_takes_search(tmp_path, step, needle):
    with pytest.raises(InputError) as e:
        load_policy(tiny_policy(tmp_path, [step]))
    assert needle in e.value.line() and "\n" not in e.value.line()


def test_a_search_step_is_refused_on_the_cuda_target(tmp_path):
    path = tiny_policy(tmp_path, [Q8_STEP])
    doc = yaml.safe_load(path.read_text())
    doc["steps"]["cuda"] = [{**SEARCH_STEP, "search": {"max_bpw": 5.0}}]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError, match="steps.cuda.0: kind search writes GGUF"):
        load_policy(path, target="cuda")


def test_the_default_budget_is_the_int4_size_bar_in_bits_per_weight(tmp_path, reference_dir):
    """On SmolLM2 the 3.5x bar is about 4.49 bits per weight (the file's header counts), not 16 / 3.5 = 4.57: a
    file at the default budget is at least 3.5x smaller than the F16 GGUF."""
    from quantloop.agents.search_step import SearchStep, budget_bpw
    from quantloop.models.checkpoints import resolve_model
    from quantloop.search.allocate import budget_bytes_for_bpw
    from quantloop.search.tensors import model_tensors

    _, spec = load_policy(tiny_policy(tmp_path, [Q8_STEP], size_ratio=3.5))
    bpw = budget_bpw(SearchStep(), spec, reference_dir)
    assert 4.40 < bpw < 16 / 3.5, bpw
    gguf = resolve_model(reference_dir).gguf
    assert gguf.stat().st_size / budget_bytes_for_bpw(model_tensors(gguf), bpw) >= 3.5 - 1e-4
    assert budget_bpw(SearchStep(max_bpw=6.1), spec, reference_dir) == 6.1


# ------------------------------------------------------------------------- the agent on a finished search


def front_member(mt, genome: dict[str, str], trial: int, kld: float, maps: Path):
    from quantloop.search.precision_maps import write_map
    from quantloop.search.schemas import CandidateMeasurement, FrontMember
    from quantloop.search.tensors import genome_bits_per_weight, genome_bytes

    nbytes, bpw = genome_bytes(mt, genome), genome_bits_per_weight(mt, genome)
    j, y = write_map(genome, maps / f"trial-{trial}", {"trial": trial})
    measured = CandidateMeasurement(genome=genome, kld_mean=kld, kld_by_domain={"shakespeare": kld}, ppl_increase_pct=kld * 10,
                                    bytes=nbytes, bytes_written=nbytes, bits_per_weight=bpw, tg_tokens_per_s=100.0)
    return FrontMember(trial=trial, origin=f"test@{bpw:.2f}", measured=measured, map_json=str(j), map_yaml=str(y))


@pytest.fixture(scope="module")
def finished_search(tiny_prepared, tmp_path_factory):
    """A search result over the tiny model: all Q4_0 (worst KLD), a Q4_0/Q5_0/Q8_0 mix, all Q8_0 (best KLD)."""
    from quantloop.fileio import write_json_atomic
    from quantloop.models.checkpoints import resolve_model
    from quantloop.search.schemas import SearchResult
    from quantloop.search.tensors import model_tensors, uniform_genome

    out = tmp_path_factory.mktemp("search")
    mt = model_tensors(resolve_model(tiny_prepared).gguf, ("Q4_0", "Q5_0", "Q8_0", "F16"))
    cycle = ["Q4_0", "Q8_0", "Q5_0"]
    mixed = {t.name: cycle[i % 3] for i, t in enumerate(mt.tensors)}
    front = [front_member(mt, uniform_genome(mt, "Q4_0"), 0, 0.30, out / "maps"), front_member(mt, mixed, 1, 0.10, out / "maps"),
             front_member(mt, uniform_genome(mt, "Q8_0"), 2, 0.01, out / "maps")]
    result = SearchResult(study="t", storage=str(out / "search.journal"), trials_complete=3, trials_measured_here=3, front=front,
                          baselines=[], target="cpu", result_json=str(out / "search_result.json"), wall_s=1.0)
    write_json_atomic(out / "search_result.json", result)
    return out / "search_result.json", front


def plan_and_state(tiny, tmp_path, search: dict, dataset_dir: str = ""):
    from quantloop.agents.evaluation import build_plan
    from quantloop.agents.state import CheckpointScore, PipelineState

    policy, spec = load_policy(tiny_policy(tmp_path, [{**SEARCH_STEP, "search": search}, Q8_STEP]))
    ranked = [CheckpointScore.model_construct(name="tiny", path=str(tiny))]  # the plan reads name and path only
    plan = build_plan(policy, ranked, tmp_path / "runs")
    state = PipelineState(run_id="x", model=str(tiny), target="cpu", policy=policy, acceptance_spec=str(spec),
                          dataset_dir=dataset_dir or str(tmp_path), output_root=str(tmp_path / "runs"), plan=plan)
    return plan, state


def written_types(gguf_path: str) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(gguf_path).tensors}


def test_the_agent_quantizes_to_the_lowest_kld_member_within_the_budget(finished_search, tiny_prepared, tmp_path):
    from quantloop.agents.quantization import QuantizationAgent

    result_json, front = finished_search
    q4, mixed, q8 = front
    budget = (mixed.measured.bits_per_weight + q8.measured.bits_per_weight) / 2  # Q4_0 and the mix fit, Q8_0 does not
    plan, state = plan_and_state(tiny_prepared, tmp_path, {"result": str(result_json), "max_bpw": budget})
    assert plan[0].kind == "search" and plan[0].spec is None and Path(plan[0].output_dir).name == "0-tiny_search-searched"  # <index>-<checkpoint>_<tag>, in the run's folder
    attempt = QuantizationAgent().attempt(plan[0], state)
    assert attempt.status == "quantized", attempt.note
    assert attempt.output_dir == plan[0].output_dir and attempt.method == "gguf"
    written = written_types(attempt.quantization.model_path)
    assert {n: written[n] for n in mixed.measured.genome} == mixed.measured.genome
    assert "trial 1 " in attempt.note and mixed.map_yaml in attempt.note and str(result_json) in attempt.note


def test_a_budget_below_every_member_skips_the_step_with_the_smallest_members_bits(finished_search, tiny_prepared, tmp_path):
    from quantloop.agents.quantization import QuantizationAgent

    result_json, front = finished_search
    smallest = min(m.measured.bits_per_weight for m in front)
    plan, state = plan_and_state(tiny_prepared, tmp_path, {"result": str(result_json), "max_bpw": 2.0})
    attempt = QuantizationAgent().attempt(plan[0], state)
    assert attempt.status == "skipped" and attempt.quantization is None
    assert "fits 2 bits per weight" in attempt.note and f"has {smallest:.3f} bits per weight" in attempt.note
    assert "trial 0" in attempt.note and "\n" not in attempt.note
    assert not Path(plan[0].output_dir).exists()


def test_a_run_validates_the_searched_map_accepts_it_and_resumes_without_redoing_it(finished_search, tiny_prepared, dataset_dir,
                                                                                  tmp_path):
    result_json, front = finished_search
    policy = tiny_policy(tmp_path, [{**SEARCH_STEP, "search": {"result": str(result_json), "max_bpw": 16.0}}, Q8_STEP])
    state = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy)
    first = state.attempts[0]
    assert [a.step for a in state.attempts] == ["searched"] and first.verdict == "accepted", first.reason
    assert "trial 2 " in first.note  # the all-Q8_0 member: the lowest KLD of the three
    assert {"validation_report.json", "generations.md"} <= {p.name for p in Path(first.output_dir).iterdir()}
    again = run_tiny(tmp_path, tiny_prepared, dataset_dir, policy)  # the stored policy (with its search step) is read back
    assert again.policy.plan_steps()[0].search.max_bpw == 16.0 and again.attempts == state.attempts


def test_without_a_result_file_the_step_runs_a_short_search_next_to_its_folder(tiny_prepared, dataset_dir, tmp_path):
    from quantloop.agents.quantization import QuantizationAgent
    from quantloop.search.schemas import SearchResult

    missing = tmp_path / "no-such" / "search_result.json"
    search = {"result": str(missing), "max_bpw": 6.0, "types": ["Q4_0", "Q8_0"], "trials": 2, "population": 2,
              "seqlen": 64, "speed_tokens": 4, "validate_front": 0}
    plan, state = plan_and_state(tiny_prepared, tmp_path, search, str(dataset_dir))
    attempt = QuantizationAgent().attempt(plan[0], state)
    assert attempt.status == "quantized", attempt.note
    own = Path(f"{plan[0].output_dir}.search") / "search_result.json"
    result = SearchResult.model_validate_json(own.read_text())
    assert result.trials_complete >= 2 and f"{missing} not found" in attempt.note and str(own) in attempt.note
    picked = next(m for m in result.front if f"trial {m.trial} " in attempt.note)
    assert picked.measured.bits_per_weight <= 6.0
    written = written_types(attempt.quantization.model_path)
    assert {n: written[n] for n in picked.measured.genome} == picked.measured.genome


# ------------------------------------------------------------------------- quantloop search --bpw-margin


def search_args(tiny, dataset_dir, out, *more):
    return ["search", str(tiny), "--text", str(dataset_dir), "--out", str(out), "--types", "Q4_0,Q8_0", "--budgets", "6.0",
            "--seqlen", "64", "--chunks", "1", "--sens-chunks", "1", *more]


def test_bpw_margin_sets_the_size_cap_of_the_stored_search(tiny_prepared, dataset_dir, tmp_path):
    from quantloop.pipelines.search_command import main
    from quantloop.search.study import load_study, open_storage

    assert main(search_args(tiny_prepared, dataset_dir, tmp_path / "o", "--workers", "0", "--bpw-margin", "0.1")) == 0
    _, config = load_study(open_storage(str(tmp_path / "o" / "search.journal")), "quantloop-search")
    assert config["bpw_margin"] == 0.1 and config["max_bpw"] == pytest.approx(6.1)  # the default margin would cap at 6.3


def test_bpw_margin_defaults_to_the_requests_and_refuses_a_negative_one(tiny_prepared, dataset_dir, tmp_path, capsys):
    import argparse

    from quantloop.pipelines.search_command import add_search_commands, search_request

    parser = argparse.ArgumentParser(prog="quantloop")
    add_search_commands(parser.add_subparsers(dest="command"))
    assert search_request(parser.parse_args(search_args(tiny_prepared, dataset_dir, tmp_path))).bpw_margin == 0.3
    with pytest.raises(SystemExit) as e:
        parser.parse_args(search_args(tiny_prepared, dataset_dir, tmp_path, "--bpw-margin", "-1"))
    assert e.value.code == 2 and "--bpw-margin: -1 is below 0 bits per weight" in capsys.readouterr().err
