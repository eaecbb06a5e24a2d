"""The knowledge store: atoms in a hyperon AtomSpace, persisted, merged between writers, and priors only from
related models (same family, same tensor role, other weights)."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys

import pytest

from quantloop.knowledge import AttemptFact, FrontFact, KnowledgeStore, MeasurementFact, ModelFact, TensorFact

A = ModelFact(digest="aaaa", name="base", architecture="LlamaForCausalLM", family="llama:L2-H64", n_params=1000)
B = ModelFact(digest="bbbb", name="fine-tune", architecture="LlamaForCausalLM", family="llama:L2-H64", n_params=1000)
C = ModelFact(digest="cccc", name="other", architecture="Qwen2ForCausalLM", family="qwen2:L2-H64", n_params=1000)


def meas(model: ModelFact, unit="blk.0.ffn_down", role="ffn_down", typ="Q2_K", kld=0.02, stderr=0.001, text="t") -> MeasurementFact:
    return MeasurementFact(digest=model.digest, unit=unit, role=role, layer=0, type=typ, text=text, kld=kld, stderr=stderr, n_tokens=1020)


def one_of_each() -> list:
    return [A, TensorFact(digest="aaaa", unit="blk.0.ffn_down", role="ffn_down", layer=0, n_weights=8192, shape=(64, 128)),
            meas(A), meas(A, typ="Q3_K", stderr=None),
            AttemptFact(digest="aaaa", run_id="r1", step="int4-gptq", tag="gptq-q4_0", method="gptq", status="validated",
                        verdict="fallback", passed=False, reason='fails on perplexity +4.83 % "needs < 2 %"',
                        metrics={"kld.ppl_increase_pct": 4.83}, acceptance="abc"),
            FrontFact(digest="aaaa", study="s", trial=3, kld_mean=0.034, bytes=123456, bits_per_weight=6.2,
                      tg_tokens_per_s=88.5, genome={"blk.0.ffn_down.weight": "Q6_K"})]


def test_every_atom_kind_round_trips_through_the_file(tmp_path):
    path = tmp_path / "k" / "atomspace.metta"
    store = KnowledgeStore.open(path)
    facts = one_of_each()
    assert all(store.put(f) for f in facts) and not store.put(facts[0])  # a fact is held once
    store.save()
    again = KnowledgeStore.open(path)
    got = [f for kind in ("Model", "Tensor", "Measurement", "Attempt", "Front") for f in again.facts(kind)]
    assert sorted(map(repr, got)) == sorted(map(repr, facts))
    assert again.stats()["by_kind"] == {"Model": 1, "Tensor": 1, "Measurement": 2, "Attempt": 1, "Front": 1}
    # a MeTTa pattern: the measurements at Q2_K of any model, unit and text
    hits = again.query('(Measurement $d $u "ffn_down" $l "Q2_K" $t $tv $k)')
    assert [str(h) for h in hits] == [str(h) for h in again.query(str(hits[0]))] and len(hits) == 1
    assert again.facts("Measurement", type="Q3_K")[0].stderr is None


def test_a_prior_comes_only_from_the_same_family_and_tensor_role_and_never_from_this_model(tmp_path):
    store = KnowledgeStore.open(tmp_path / "s.metta")
    for f in (A, B, C, meas(B, kld=0.020), meas(C, kld=0.5), meas(B, unit="blk.0.attn_output", role="attn_output", kld=0.3),
              meas(A, kld=9.9)):
        store.put(f)
    p = store.prior(A, "blk.0.ffn_down", "ffn_down", "Q2_K", text="t")
    assert p is not None and p.kld == pytest.approx(0.020) and p.sources == ["fine-tune"]  # not C (other family), not A itself
    assert p.sigma >= 0.25 * 0.020  # one related checkpoint: at least the assumed spread between checkpoints
    assert store.prior(A, "blk.0.ffn_down", "attn_output", "Q2_K") is None  # another role
    assert store.prior(A, "blk.0.ffn_down", "ffn_down", "Q4_0") is None  # nothing stored at that type
    assert store.prior(C, "blk.0.ffn_down", "ffn_down", "Q2_K") is None  # no other model of C's family
    assert store.measured(A, "t")[("blk.0.ffn_down", "Q2_K")].kld == 9.9  # A's own row: a measurement, not a prior
    assert store.prior(B, "blk.0.ffn_down", "ffn_down", "Q2_K").kld == pytest.approx(9.9)  # A is B's relative


@pytest.mark.parametrize("damage, aside", [
    (lambda t: t[: len(t) // 2], "corrupt"),  # truncated
    (lambda t: t.replace("(Measurement", "(Measurement (", 1), "corrupt"),  # malformed, checksum broken
    (lambda t: t.replace("(KnowledgeVersion 1)", "(KnowledgeVersion 7)"), "incompatible"),
    (lambda t: "\x00\x01garbage", "corrupt"),
])
def test_an_unreadable_store_is_kept_aside_with_one_warning_and_the_run_goes_on_without_memory(tmp_path, damage, aside):
    path = tmp_path / "atomspace.metta"
    store = KnowledgeStore.open(path)
    for f in one_of_each():
        store.put(f)
    store.save()
    bad = damage(path.read_text())
    path.write_text(bad)
    warnings: list[str] = []
    off = KnowledgeStore.open(path, on_warning=warnings.append)
    assert len(warnings) == 1 and str(path) in warnings[0] and "without memory" in warnings[0], warnings
    assert not off.enabled and off.query("(Model $d $n $a $f $p)") == [] and off.prior(A, "u", "r", "Q2_K") is None
    kept = list(tmp_path.glob(f"atomspace.metta.{aside}-*"))
    assert len(kept) == 1 and kept[0].read_text() == bad and kept[0].name in warnings[0]
    assert not off.put(A)
    off.save()  # off: writes nothing, so the damaged file is never replaced by a partial one
    assert not path.exists()
    assert KnowledgeStore.open(path).enabled  # the next run starts a new store


def test_the_command_line_warns_in_one_line(tmp_path):
    path = tmp_path / "atomspace.metta"
    path.write_text("(KnowledgeVersion 1)\n(Model \"x\"")
    proc = subprocess.run([sys.executable, "-c", f"from quantloop.knowledge import KnowledgeStore; KnowledgeStore.open({str(path)!r})"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and len(proc.stderr.strip().splitlines()) == 1 and "truncated" in proc.stderr


def _writer(path, tag: str, n: int) -> None:
    store = KnowledgeStore.open(path)
    for i in range(n):
        store.put(meas(A, unit=f"blk.{i}.{tag}", role=tag, kld=i / 1000))
        if i % 10 == 9:
            store.save()
    store.save()


def test_two_writers_at_once_lose_neither_ones_atoms(tmp_path):
    path = tmp_path / "atomspace.metta"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, tag, 120)) for tag in ("ffn_down", "attn_output")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    store = KnowledgeStore.open(path)
    assert len(store.facts("Measurement", role="ffn_down")) == 120 and len(store.facts("Measurement", role="attn_output")) == 120


def test_thousands_of_distinct_values_are_queried_without_hyperons_index_failure(tmp_path):
    """hyperon 0.2.10 aborts on a query past 1024 distinct leaf atoms in one space; the store shards its atoms."""
    store = KnowledgeStore.open(tmp_path / "s.metta")
    for i in range(1500):
        store.put(meas(A, unit=f"blk.{i}.ffn_down", kld=i / 7919, stderr=i / 104729))
    assert store.space.shards > 1
    assert len(store.facts("Measurement", digest="aaaa")) == 1500


def test_forget_removes_a_models_atoms_from_the_file(tmp_path):
    path = tmp_path / "s.metta"
    store = KnowledgeStore.open(path)
    for f in (A, B, meas(A), meas(B)):
        store.put(f)
    store.save()
    assert store.forget("fine-tune") == 2
    again = KnowledgeStore.open(path)
    assert [m.name for m in again.models()] == ["base"] and len(again.facts("Measurement")) == 1


def test_a_store_the_file_system_refuses_is_one_warning_and_no_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a path through a file: no folder can be made there
    warnings: list[str] = []
    off = KnowledgeStore.open(blocker / "k" / "atomspace.metta", on_warning=warnings.append)
    assert not off.enabled and len(warnings) == 1 and "without memory" in warnings[0]
    store = KnowledgeStore.open(tmp_path / "ok" / "atomspace.metta")
    store.put(A)
    store.path = blocker / "k" / "atomspace.metta"
    store.save()  # one warning on stderr, no exception: the run goes on
    assert not store.enabled and "not writable" in store.note
