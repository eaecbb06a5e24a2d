"""Calibration mixed from several text domains, and validation judged on held-out domains too."""

import random

import pytest

from quantloop.data.calibration import calibration_sequences, calibration_text_file
from quantloop.data.datasets import manifest_digest, prepare_text
from quantloop.errors import InputError
from quantloop.schemas import CalibrationSpec, ValidationRequest
from spec_helpers import validation_spec


class WordTokenizer:
    """One token per word (the ids are the word's index): enough to count where each sequence came from."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}


def corpus(folder, words: str, n_docs=20, seed=0, para_words=80):
    rng = random.Random(seed)
    words = words.split()
    folder.mkdir(parents=True)
    for i in range(n_docs):
        paras = [" ".join(rng.choice(words) for _ in range(para_words)) for _ in range(8)]
        (folder / f"doc{i:02d}.txt").write_text("\n\n".join(paras))
    return folder


@pytest.fixture
def two_domains(tmp_path):
    prepare_text(corpus(tmp_path / "a", "king queen sword crown night storm"), "plays", tmp_path / "datasets")
    prepare_text(corpus(tmp_path / "b", "def class import return lambda yield", n_docs=10, seed=1, para_words=100), "code", tmp_path / "datasets")
    return tmp_path / "datasets" / "plays", tmp_path / "datasets" / "code"


def test_a_mix_shares_the_samples_and_takes_them_in_turn(two_domains, tmp_path):
    plays, code = two_domains
    tok = WordTokenizer()
    single, d1 = calibration_sequences(CalibrationSpec(dataset_dir=str(plays), samples=5, seqlen=32), tok)
    mixed, d2 = calibration_sequences(CalibrationSpec(dataset_dir=str(plays), mix=[str(code)], samples=5, seqlen=32), tok)
    code_words = {tok.vocab[w] for w in "def class import return lambda yield".split()}
    origin = ["code" if set(s) <= code_words else "plays" if not set(s) & code_words else "both" for s in mixed]
    assert origin == ["plays", "code", "plays", "code", "plays"]  # 3 + 2, in turn: a prefix is mixed too
    assert all(len(s) == 32 for s in mixed) and mixed[0] == single[0]
    assert d1 == manifest_digest(plays) and d2 != d1  # the mix is identified by both manifests
    swapped, d3 = calibration_sequences(CalibrationSpec(dataset_dir=str(code), mix=[str(plays)], samples=5, seqlen=32), tok)
    assert d3 != d2

    path, _ = calibration_text_file(CalibrationSpec(dataset_dir=str(plays), mix=[str(code)]), None, tmp_path)
    head = path.read_text()[:6000]
    assert "king" in head or "queen" in head
    assert "lambda" in head or "import" in head  # both domains in the first chunks llama-imatrix reads


def test_a_domain_short_of_its_share_gives_what_it_has_and_the_others_make_up_the_rest(two_domains):
    plays, code = two_domains  # calibration splits of 4 x 8 x 80 and 2 x 8 x 100 words: 40 and 25 samples of 64
    tok = WordTokenizer()
    seqs, _ = calibration_sequences(CalibrationSpec(dataset_dir=str(code), mix=[str(plays)], samples=60, seqlen=64), tok)
    code_words = {tok.vocab[w] for w in "def class import return lambda yield".split()}
    from_code = sum(set(s) <= code_words for s in seqs)
    assert len(seqs) == 60 and from_code == 25  # code holds 25 of its 30; plays gives 35
    assert [set(s) <= code_words for s in seqs[:4]] == [True, False, True, False]  # in turn while both last
    with pytest.raises(InputError, match="65 samples of 64, 66 requested"):
        calibration_sequences(CalibrationSpec(dataset_dir=str(code), mix=[str(plays)], samples=66, seqlen=64), tok)


def test_a_mix_too_small_or_not_prepared_is_one_clear_error(two_domains, tmp_path):
    plays, code = two_domains
    with pytest.raises(InputError, match="calibration set too small"):
        calibration_sequences(CalibrationSpec(dataset_dir=str(plays), mix=[str(code)], samples=4000, seqlen=64), WordTokenizer())
    from quantloop.pipelines.run import check_policy_texts
    from quantloop.agents.policy import Policy

    policy = Policy.model_validate({"steps": {"cpu": [{"name": "g", "spec": {
        "method": "gptq", "gguf_type": "Q4_0", "calibration": {"mix": [str(tmp_path / "nowhere")]}}}]}})
    with pytest.raises(InputError, match="not prepared"):
        check_policy_texts(policy)
    held = Policy.model_validate({"validation": {"held_out": ["no-such-domain"]}, "steps": {"cpu": [
        {"name": "q8", "spec": {"method": "gguf", "bits": 8, "gguf_type": "Q8_0"}}]}})
    with pytest.raises(InputError, match="make domains"):
        check_policy_texts(held)


def test_a_held_out_domain_is_measured_and_judged_by_the_perplexity_bar(tiny_copy, dataset_dir, tmp_path):
    """The same Q4_0 file judged on its own test text and on a held-out domain: a criterion per domain, and a bar
    that only the held-out text misses fails the whole validation."""
    from quantloop.backends.gguf import quantize_gguf
    from quantloop.tools.validate import validate_quantization

    prepare_text(corpus(tmp_path / "words", "the function returns a list of values when called with arguments"), "words",
                 tmp_path / "datasets")
    main = tmp_path / "datasets" / "words"
    held = tmp_path / "datasets" / "plays"  # the real Shakespeare test text, as a held-out domain
    held.mkdir()
    for f in dataset_dir.iterdir():
        (held / f.name).symlink_to(f)
    q = quantize_gguf(tiny_copy / "tiny-f16.gguf", tmp_path / "tiny-q4_0.gguf", "Q4_0")

    def run(max_ppl, name):
        return validate_quantization(ValidationRequest(
            quantized=str(q), baseline=str(tiny_copy), dataset_dir=str(main), held_out=[str(held)], chunks=2,
            spec_file=validation_spec(tmp_path / name, max_ppl=max_ppl), measure_speed=False, check_generation=False))

    r = run(1000.0, "loose.yaml")
    assert set(r.held_out_kld) == {"plays"}
    h, k = r.held_out_kld["plays"], r.kld
    assert h.tokens > 0 and h.ppl_base != k.ppl_base  # another text, measured on its own
    by_name = {c.name: c for c in r.criteria}
    assert by_name["perplexity:plays"].passed and by_name["perplexity:plays"].measured == pytest.approx(h.ppl_increase_pct)
    # Q4_0 of the tiny model loses more on real text than on the random-word text it is judged on: a bar between
    # the two passes the main text and fails the held-out one, and with it the validation
    assert h.ppl_increase_pct > max(k.ppl_increase_pct, 0) + 0.1
    r2 = run((h.ppl_increase_pct + max(k.ppl_increase_pct, 0)) / 2, "between.yaml")
    assert not {c.name: c for c in r2.criteria}["perplexity:plays"].passed and not r2.passed
