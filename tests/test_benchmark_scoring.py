"""Benchmark scoring: the lm-eval adapter's log-likelihoods on llama.cpp and transformers against lm-eval's own
transformers backend (HFLM) on the tiny model, the shared-prefix batch against one evaluation per choice, and the
paired drop and its standard error."""

import json
import math

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from quantloop.benchmarks import score as score_mod
from quantloop.benchmarks.adapter import LlamaCppScorer, QuantloopLM, continuation_scores
from quantloop.benchmarks.score import PairedDrop, TaskScore, evaluate_tasks, paired_drop
from quantloop.errors import InputError
from quantloop.eval.runtimes import LlamaCppRunner, TransformersRunner
from quantloop.models.checkpoints import resolve_model

PAIRS = [
    ("Question: Which is a planet?\nAnswer:", " Mars"),
    ("Question: Which is a planet?\nAnswer:", " the Moon and the Sun"),
    ("Question: Which is a planet?\nAnswer: ", "Venus"),  # trailing space moves to the continuation
    ("The cat sat on the", " mat."),
    ("", "Hello world"),  # empty context: conditioned on the prefix token
]


def requests(pairs):
    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


@pytest.fixture(scope="module")
def runners(tiny_prepared):
    gguf = next(tiny_prepared.glob("*.gguf"))
    llama = LlamaCppRunner(gguf, threads=1)
    hf = TransformersRunner(tiny_prepared, device="cpu", threads=1)
    yield llama, hf
    llama.close()


@pytest.fixture(scope="module")
def hflm(tiny_prepared):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_prepared), device="cpu", dtype="float32", batch_size=1)


def test_loglikelihoods_equal_lm_evals_transformers_backend(runners, hflm):
    llama, hf = runners
    want = hflm.loglikelihood(requests(PAIRS), disable_tqdm=True)
    on_hf = QuantloopLM(hf).loglikelihood(requests(PAIRS), disable_tqdm=True)
    lm = QuantloopLM(llama, n_batch=128, n_seq_max=8)
    on_llama = lm.loglikelihood(requests(PAIRS), disable_tqdm=True)
    lm.close()
    assert [g for _, g in on_hf] == [g for _, g in want]
    assert [g for _, g in on_llama] == [g for _, g in want]
    np.testing.assert_allclose([x for x, _ in on_hf], [x for x, _ in want], rtol=1e-5, atol=1e-4)
    # the GGUF holds the weights in F16: the sums of log-probabilities agree to a few thousandths
    np.testing.assert_allclose([x for x, _ in on_llama], [x for x, _ in want], rtol=1e-3, atol=5e-3)
    assert all(x < 0 for x, _ in want)


def test_greedy_flags_and_values_match_a_direct_transformers_computation(runners):
    llama, hf = runners
    import torch

    context = hf.tokenize("Once upon a time there was")
    ids = list(context)
    for _ in range(3):  # the float model's own greedy continuation
        ids.append(int(np.argmax(hf.logits(ids)[-1])))
    greedy = ids[len(context):]
    other = [greedy[0], (greedy[1] + 1) % hf.n_vocab, greedy[2]]
    with torch.no_grad():
        logp = torch.log_softmax(hf.model(torch.tensor([context + greedy[:-1]])).logits[0].double(), -1)
    want = float(sum(logp[len(context) - 1 + i, t] for i, t in enumerate(greedy)))
    reqs = [(("", ""), context, greedy), (("", ""), context, other)]
    for runner in (hf, llama):
        lm = QuantloopLM(runner)
        got = lm._loglikelihood_tokens(reqs)
        lm.close()
        assert [g for _, g in got] == [True, False], runner.runtime
        assert got[0][0] == pytest.approx(want, abs=5e-3)
        assert got[1][0] < got[0][0]


def test_shared_prefix_batch_equals_one_evaluation_per_choice(runners):
    llama, _ = runners
    rng = np.random.default_rng(0)
    groups = []
    for n_ctx in (5, 17, 40, 3):
        context = [int(t) for t in rng.integers(100, 40000, n_ctx)]
        conts = [[int(t) for t in rng.integers(100, 40000, k)] for k in (1, 3, 6, 2)]
        groups.append((context, conts))
    one_by_one = [[continuation_scores(llama.logits(c + k[:-1], start=len(c) - 1), k) for k in conts] for c, conts in groups]
    for n_batch, n_seq in ((256, 16), (48, 3)):  # several questions in one batch; a question split over batches
        scorer = LlamaCppScorer(llama, n_batch=n_batch, n_seq_max=n_seq, threads=1)
        batched = scorer.score(groups)
        scorer.close()
        for b_row, o_row in zip(batched, one_by_one):
            assert [g for _, g in b_row] == [g for _, g in o_row]
            np.testing.assert_allclose([x for x, _ in b_row], [x for x, _ in o_row], rtol=1e-4, atol=1e-3)


def score(task, correct, ids=None):
    return TaskScore(task=task, items=len(correct), acc=float(np.mean(correct)), acc_stderr=0.0, correct=correct,
                     correct_norm=correct, chosen=[0] * len(correct), doc_ids=ids or list(range(len(correct))),
                     seconds=1.0, items_per_s=len(correct))


def test_paired_drop_and_its_standard_error_on_a_constructed_example():
    base = score("t", [1, 1, 1, 0, 1, 0, 1, 1, 0, 1])
    quant = score("t", [1, 0, 1, 0, 1, 1, 0, 1, 0, 0])
    d = paired_drop(base, quant)
    # differences: 0,1,0,0,0,-1,1,0,0,1 -> mean 0.2; sum of squares about the mean 4 - 10*0.04 = 3.6
    assert isinstance(d, PairedDrop)
    assert d.n == 10
    assert d.base == pytest.approx(70.0) and d.quant == pytest.approx(50.0)
    assert d.drop_pp == pytest.approx(20.0) and d.changed == 4
    assert d.stderr_pp == pytest.approx(100 * math.sqrt(3.6 / 9) / math.sqrt(10))
    assert paired_drop(base, base).drop_pp == 0 and paired_drop(base, base).stderr_pp == 0


def test_paired_drop_refuses_different_items():
    with pytest.raises(InputError, match="not of the same items"):
        paired_drop(score("t", [1, 0, 1]), score("t", [1, 0, 1], ids=[0, 2, 1]))
    with pytest.raises(InputError, match="not of the same items"):
        paired_drop(score("t", [1, 0, 1]), score("t", [1, 0]))


def tiny_task(tmp_path, n=12):
    rows = [{"q": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 7), "blue"], "label": i % 3} for i in range(n)]
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dict(dataset_path="json", dataset_kwargs={"data_files": {"test": str(path)}}, output_type="multiple_choice",
                test_split="test", doc_to_text="Question: {{q}}\nAnswer:", doc_to_target="label",
                doc_to_choice="{{choices}}", metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])


def test_evaluate_tasks_fixed_items_and_the_baseline_cache(tiny_prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(score_mod, "CACHE_DIR", tmp_path / "cache")
    gguf = next(tiny_prepared.glob("*.gguf"))
    configs = {"tiny_mc": tiny_task(tmp_path)}
    first = evaluate_tasks(gguf, configs, limit=5, model=gguf)["tiny_mc"]
    assert first.items == 5 and len(first.correct) == len(first.correct_norm) == len(first.chosen) == 5
    assert first.doc_ids == score_mod.item_order(12, "tiny_mc")[:5] and first.doc_ids != [0, 1, 2, 3, 4]
    assert first.acc == pytest.approx(np.mean(first.correct)) and not first.cached
    assert len(list((tmp_path / "cache" / "accuracy").glob("tiny_mc-*.json"))) == 1
    again = evaluate_tasks(gguf, configs, limit=5, model=resolve_model(tiny_prepared))["tiny_mc"]
    assert again.cached and again.correct == first.correct and again.doc_ids == first.doc_ids
    full = evaluate_tasks(gguf, configs, limit=None)["tiny_mc"]
    assert full.items == 12 and full.doc_ids[:5] == first.doc_ids  # a larger cap extends the same order
    assert paired_drop(first, again).drop_pp == 0 and paired_drop(first, again).changed == 0
    assert len(list((tmp_path / "cache" / "accuracy").glob("tiny_mc-*.json"))) == 1  # no model given: no cache


def test_agreement_share_and_accuracy_within_its_standard_error():
    from quantloop.benchmarks.agreement import agreement

    ours = score("t", [1, 0, 1, 1, 0, 1, 0, 1])
    theirs = score("t", [1, 0, 1, 1, 0, 1, 1, 1]).model_copy(update={"chosen": [0, 0, 0, 0, 0, 0, 2, 0]})
    ours = ours.model_copy(update={"acc_stderr": float(np.std(ours.correct, ddof=1) / math.sqrt(8))})
    a = agreement(ours, theirs)
    assert a.same_answer == pytest.approx(7 / 8)
    assert a.acc_diff_pp == pytest.approx(-12.5) and a.within_stderr == (12.5 <= 100 * ours.acc_stderr)
    with pytest.raises(InputError):
        agreement(ours, score("t", [1, 0, 1]))



def test_a_score_extended_by_its_next_items_is_the_score_of_all_of_them():
    """merged(first items, next items) has the items in order and the accuracy and standard error of all of them:
    the accuracy bar doubles its items this way instead of scoring the first ones again."""
    import numpy as np

    from quantloop.benchmarks.score import TaskScore, merged, stderr_of_mean

    def score(ids, correct, norm, seconds):
        return TaskScore(task="t", items=len(ids), acc=float(np.mean(correct)), acc_stderr=stderr_of_mean(correct),
                         acc_norm=float(np.mean(norm)), acc_norm_stderr=stderr_of_mean(norm), correct=correct,
                         correct_norm=norm, chosen=[0] * len(ids), doc_ids=ids, seconds=seconds, items_per_s=len(ids) / seconds)

    a, b = score([5, 2, 9], [1, 0, 1], [1, 1, 1], 3.0), score([4, 7], [0, 0], [1, 0], 1.0)
    m = merged(a, b)
    assert m.doc_ids == [5, 2, 9, 4, 7] and m.correct == [1, 0, 1, 0, 0] and m.items == 5
    assert m.acc == pytest.approx(0.4) and m.acc_stderr == pytest.approx(np.std([1, 0, 1, 0, 0], ddof=1) / 5 ** 0.5)
    assert m.acc_norm == pytest.approx(0.8) and m.items_per_s == pytest.approx(5 / 4.0)
