"""The agents read the knowledge store: a step whose outcome is known is skipped with the reason, what is known of
the family is cited; `quantloop knowledge` and the knowledge tool show, query and forget."""

from __future__ import annotations

import pytest

from quantloop.agents.lessons import attempt_fact, checkpoint_fact, lessons, spec_key
from quantloop.agents.policy import load_policy
from quantloop.agents.reviewer import ReviewerAgent
from quantloop.agents.state import Attempt, PipelineState, PlannedAttempt
from quantloop.errors import InputError
from quantloop.knowledge import KnowledgeStore, ModelFact
from quantloop.schemas import CriterionResult, quant_spec


def state_for(tiny, run_id="r2", sha="acc1") -> tuple[PipelineState, PlannedAttempt]:
    policy, spec = load_policy()
    planned = PlannedAttempt(index=0, step="int8", kind="quantize", spec=quant_spec(method="gguf", gguf_type="Q8_0"),
                             checkpoint=str(tiny), output_dir=None)
    state = PipelineState(run_id=run_id, model=str(tiny), target="cpu", policy=policy, acceptance_spec=str(spec),
                          acceptance_sha256=sha, dataset_dir="", output_root="", plan=[planned])
    return state, planned


def failed(planned, state, *names: str) -> Attempt:
    crit = [CriterionResult(name=n, passed=False, measured=1.0, threshold="< 0.5", detail="x") for n in names]
    return Attempt(index=0, step=planned.step, kind="quantize", method="gguf", bits=8, checkpoint=planned.checkpoint,
                   output_dir=None, status="validated", criteria=crit, verdict="fallback",
                   reason=f"int8 fails on {' and '.join(names)}; next: q4")


def test_a_step_that_failed_on_the_same_weights_is_skipped_and_one_on_the_family_is_cited(tiny_prepared, tmp_path):
    store = KnowledgeStore.open(tmp_path / "k.metta")
    model = checkpoint_fact(str(tiny_prepared))
    old, planned = state_for(tiny_prepared, run_id="r1")
    state, _ = state_for(tiny_prepared)
    assert lessons(store, planned, state).skip is None  # nothing known yet
    store.put(model)
    store.put(attempt_fact(failed(planned, old, "perplexity"), planned, old, model))
    lesson = lessons(store, planned, state)
    assert lesson.skip and "failed on this model" in lesson.skip and "run r1" in lesson.skip and "perplexity" in lesson.skip
    assert lessons(store, planned, state.model_copy(update={"acceptance_sha256": "other"})).skip is None  # another bar
    assert lessons(KnowledgeStore.off(), planned, state).skip is None
    assert lessons(store, planned.model_copy(update={"spec": quant_spec(method="gguf", gguf_type="Q4_0")}), state).skip is None

    noisy = KnowledgeStore.open(tmp_path / "n.metta")  # failed on speed alone: measured again, cited
    noisy.put(model)
    noisy.put(attempt_fact(failed(planned, old, "speed"), planned, old, model))
    lesson = lessons(noisy, planned, state)
    assert lesson.skip is None and lesson.evidence == ["failed on speed on this model in run r1"]

    family = KnowledgeStore.open(tmp_path / "f.metta")  # failed on another checkpoint of the family: cited, not skipped
    sibling = ModelFact(digest="0123", name="sibling", architecture=model.architecture, family=model.family)
    family.put(sibling)
    family.put(attempt_fact(failed(planned, old, "perplexity"), planned, old, sibling))
    lesson = lessons(family, planned, state)
    assert lesson.skip is None and lesson.evidence == ["failed on perplexity on sibling (same family) in run r1"]
    # the reviewer cites it in the attempt's reason
    a = failed(planned, state, "perplexity").model_copy(update={"evidence": lesson.evidence, "verdict": None, "reason": ""})
    reason = ReviewerAgent()(state.model_copy(update={"attempts": [a], "next_index": 1}))["attempts"][-1].reason
    assert reason.endswith("Memory: failed on perplexity on sibling (same family) in run r1."), reason
    assert spec_key(planned) != spec_key(planned.model_copy(update={"spec": quant_spec(method="gguf", gguf_type="Q4_0")}))

    # a criterion left unmeasured once the attempt had failed (speed after perplexity) is not cited as failed
    unmeasured = CriterionResult(name="speed", passed=False, measured=None, threshold=">= 1.5x", detail="not measured: ...")
    partly = failed(planned, old, "perplexity")
    partly = partly.model_copy(update={"criteria": partly.criteria + [unmeasured]})
    cited = KnowledgeStore.open(tmp_path / "c.metta")
    cited.put(sibling)
    cited.put(attempt_fact(partly, planned, old, sibling))
    assert lessons(cited, planned, state).evidence == ["failed on perplexity on sibling (same family) in run r1"]


def test_the_knowledge_command_and_tool_show_query_and_forget(tmp_path, capsys):
    from quantloop.knowledge import MeasurementFact
    from quantloop.pipelines.cli import main
    from quantloop.tools.catalog import tool_entry
    from quantloop.tools.knowledge import KnowledgeRequest

    path = tmp_path / "k.metta"
    store = KnowledgeStore.open(path)
    m = ModelFact(digest="d1", name="base", architecture="LlamaForCausalLM", family="llama:x")
    store.put(m)
    store.put(MeasurementFact(digest="d1", unit="blk.0.ffn_down", role="ffn_down", layer=0, type="Q2_K", text="t", kld=0.03))
    store.save()
    assert main(["knowledge", "show", "--store", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 atoms" in out and "Measurement  1" in out
    assert main(["knowledge", "query", '(Measurement $d $u "ffn_down" $l $t $x $tv $k)', "--store", str(path)]) == 0
    out = capsys.readouterr().out
    assert '(Measurement "d1" "blk.0.ffn_down" "ffn_down" 0 "Q2_K" "t"' in out and "1 atom(s) matched" in out
    report = tool_entry("knowledge").run(KnowledgeRequest(action="query", pattern="(Model $d $n $a $f $p)", store=str(path)))
    assert report.matched == 1 and report.by_kind["Model"] == 1 and report.file_bytes == path.stat().st_size
    with pytest.raises(InputError, match="not a MeTTa pattern"):
        tool_entry("knowledge").run(KnowledgeRequest(action="query", pattern="(Model $d", store=str(path)))
    assert main(["knowledge", "forget", "base", "--store", str(path)]) == 0
    assert "2 atom(s) removed" in capsys.readouterr().out
    assert main(["knowledge", "forget", "base", "--store", str(path)]) == 2
    assert "no model named" in capsys.readouterr().err


def test_a_second_run_skips_the_step_the_first_failed_and_no_memory_tries_it(tiny_prepared, dataset_dir, tmp_path):
    from pipeline_helpers import run_tiny, tiny_policy

    step = {"name": "int4-q4_0", "spec": {"method": "gguf", "bits": 4, "gguf_type": "Q4_0"}}
    policy = tiny_policy(tmp_path, [step], measure_speed=False, size_ratio=100.0)
    first = run_tiny(tmp_path / "1", tiny_prepared, dataset_dir, policy, run_id="first")
    assert first.attempts[0].verdict == "rejected" and first.attempts[0].status == "validated"
    store = KnowledgeStore.open()  # the store the run wrote (this test's own, see conftest)
    assert [f.run_id for f in store.facts("Attempt")] == ["first"] and len(store.models()) == 1
    second = run_tiny(tmp_path / "2", tiny_prepared, dataset_dir, policy, run_id="second")
    a = second.attempts[0]
    assert a.status == "skipped" and a.note.startswith("memory: the same spec failed on this model") and "run first" in a.note
    assert "saving about" in a.note, a.note
    assert "memory:" in a.reason and second.decision == "rejected"
    third = run_tiny(tmp_path / "3", tiny_prepared, dataset_dir, policy, run_id="third", memory=False)
    assert third.attempts[0].status == "validated" and not third.policy.memory
    assert [f.run_id for f in KnowledgeStore.open().facts("Attempt")] == ["first"]  # neither the skip nor --no-memory recorded


def test_a_search_front_is_recorded_for_its_checkpoint(tiny_prepared, tmp_path):
    from quantloop.agents.lessons import remember_front
    from quantloop.search.schemas import CandidateMeasurement, FrontMember, SearchResult

    measured = CandidateMeasurement(genome={"blk.0.ffn_down.weight": "Q8_0"}, kld_mean=0.0123, kld_by_domain={"s": 0.0123},
                                    ppl_increase_pct=0.4, bytes=1000, bytes_written=1000, bits_per_weight=6.2, tg_tokens_per_s=90.5)
    result = SearchResult(study="st", storage="j", trials_complete=3, trials_measured_here=3, target="cpu", wall_s=1.0,
                          front=[FrontMember(trial=2, origin="greedy@6.2", measured=measured)], baselines=[],
                          result_json=str(tmp_path / "r.json"))
    (tmp_path / "r.json").write_text(result.model_dump_json())
    store = KnowledgeStore.open(tmp_path / "k.metta")
    planned = PlannedAttempt(index=0, step="search", kind="search", spec=None, checkpoint=str(tiny_prepared), output_dir=None)
    assert remember_front(store, planned, tmp_path / "r.json") == 2  # the model and one front member
    front = KnowledgeStore.open(tmp_path / "k.metta").facts("Front")
    assert [(f.trial, f.kld_mean, f.bits_per_weight, f.genome) for f in front] == [(2, 0.0123, 6.2, measured.genome)]
    assert front[0].digest == checkpoint_fact(str(tiny_prepared)).digest


def test_the_served_knowledge_tool_reads_the_data_folders_store(tmp_path):
    import json

    import anyio
    from mcp import Client

    from quantloop.serve.mcp_server import build_server

    store = KnowledgeStore.open(tmp_path / "knowledge" / "atomspace.metta")
    store.put(ModelFact(digest="d1", name="served", architecture="LlamaForCausalLM", family="llama:x"))
    store.save()

    async def go():
        async with Client(build_server(tmp_path)) as client:
            return await client.call_tool("knowledge", {"action": "query", "pattern": "(Model $d $n $a $f $p)"})

    result = anyio.run(go)
    assert not result.is_error, result
    report = json.loads(result.content[0].text)
    assert report["matched"] == 1 and '"served"' in report["matches"][0]
    assert report["path"] == str(tmp_path / "knowledge" / "atomspace.metta")
