import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
# the knowledge store of the tests' runs: one per session, never the user's SLM/knowledge/
os.environ["QUANTLOOP_KNOWLEDGE"] = os.path.join(__import__("tempfile").mkdtemp(prefix="quantloop-knowledge-"), "atomspace.metta")

from quantloop.paths import DATASETS_DIR, DEFAULT_MODEL_DIR  # noqa: E402 (after the test environment is set)

DATASET_DIR = DATASETS_DIR / "shakespeare"


def need_prepared():
    if not (DEFAULT_MODEL_DIR / "quantloop_model.json").is_file() or not (DATASET_DIR / "manifest.json").is_file():
        pytest.skip("the reference model and text are not prepared: run `make test` (it runs `quantloop prepare` first)")


@pytest.fixture(autouse=True, scope="session")
def default_spec_without_accuracy(tmp_path_factory):
    """A test that validates with the default acceptance spec measures what it tests, not nine benchmarks on its model
    (Gemma 3's vocabulary makes that an hour): the default spec here is specs/acceptance.yaml without its accuracy
    section. Tests of the accuracy bar pass their own spec; test_tools' complete-report test reads the real file."""
    import yaml

    from quantloop import specs

    data = yaml.safe_load(specs.DEFAULT_SPEC.read_text())
    data["acceptance"].pop("accuracy", None)
    data["acceptance"]["quality"] = "perplexity"
    path = tmp_path_factory.mktemp("default-spec") / "acceptance.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(specs, "DEFAULT_SPEC", path)
        yield path


@pytest.fixture(autouse=True)
def own_knowledge_store(tmp_path_factory, monkeypatch):
    """Every test its own knowledge store: a run never skips a step because another test's run failed it."""
    monkeypatch.setenv("QUANTLOOP_KNOWLEDGE", str(tmp_path_factory.mktemp("knowledge") / "atomspace.metta"))


@pytest.fixture(autouse=True)
def own_step_costs(tmp_path_factory, monkeypatch):
    """Every test its own step-cost record: a test's measured seconds never set another test's (or the user's) time limits."""
    monkeypatch.setenv("QUANTLOOP_STEP_COSTS", str(tmp_path_factory.mktemp("step-costs")))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    need_prepared()
    return DEFAULT_MODEL_DIR


@pytest.fixture(scope="session")
def dataset_dir() -> Path:
    need_prepared()
    return DATASET_DIR


def build_tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer (vocabulary 49152), saved as an HF checkpoint;
    the feed-forward is twice as wide as `hidden`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, reference_dir) -> Path:
    """The tiny Llama prepared like any user checkpoint: float32 HF folder + F16 GGUF + manifest."""
    from quantloop.models.checkpoints import prepare_model

    root = tmp_path_factory.mktemp("tiny")
    raw = build_tiny_llama(root / "raw", reference_dir)
    prepare_model(raw, "tiny", root / "checkpoints")
    return root / "checkpoints" / "tiny"


def prepare_wide_llama(root: Path, tokenizer_dir: Path, layers: int) -> Path:
    """A random 256-wide Llama (k-quant super-blocks divide every row), prepared: HF folder + F16 GGUF + manifest."""
    from quantloop.models.checkpoints import prepare_model

    build_tiny_llama(root / "raw", tokenizer_dir, layers=layers, hidden=256)
    prepare_model(root / "raw", "wide", root / "checkpoints")
    return root / "checkpoints" / "wide"


@pytest.fixture
def tiny_copy(tmp_path, tiny_prepared) -> Path:
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_prepared, dst)
    return dst


# A trained micro Llama with three step_N checkpoints: trained once (about a minute on 2 cores) and cached
# outside the checkout, keyed by everything that changes it. Regenerate by deleting the folder; the command is
#   quantloop train-slm --size micro --steps 90 --save-every 30 --batch-size 8 --seqlen 64 --out DIR
TRAINED_RUN = dict(size="micro", steps=90, save_every=30, batch_size=8, seqlen=64, lr=1e-2, seed=0, eval_windows=8)


@pytest.fixture(scope="session")
def trained_checkpoints(reference_dir, dataset_dir) -> Path:
    import hashlib
    import json

    import torch
    import transformers

    from quantloop.data.datasets import manifest_digest
    from quantloop.paths import CACHE_DIR
    from quantloop.pipelines import train_slm as train

    key = hashlib.sha256(json.dumps([TRAINED_RUN, train.SIZES["micro"], manifest_digest(dataset_dir), torch.__version__,
                                     transformers.__version__], sort_keys=True).encode()).hexdigest()[:12]
    out = CACHE_DIR / "fixtures" / f"micro-{key}"
    train.train_slm(out, dataset_dir=dataset_dir, tokenizer_dir=reference_dir, progress=False, **TRAINED_RUN)  # resumes: no-op when done
    return out


def llama_cpp_logits_match(hf_dir: Path, gguf_path: Path, text: str, top1: float = 0.0) -> float:
    """llama.cpp runs the GGUF and computes what transformers computes with the HF checkpoint's weights: the largest
    logit difference is at most 1 % of the largest logit (llama.cpp rounds activations to 8 bits for quantized
    matmuls: close, not equal), and at least `top1` of the positions pick the same next token. Returns the ratio."""
    import numpy as np

    from quantloop.eval.runtimes import LlamaCppRunner, TransformersRunner

    hf = TransformersRunner(hf_dir, device="cpu")
    ids = hf.tokenize(text)
    a = hf.logits(ids)
    del hf
    b = LlamaCppRunner(gguf_path, n_ctx=64).logits(ids)
    assert a.shape == b.shape and np.isfinite(b).all()
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    assert rel <= 0.01, rel
    assert (a.argmax(axis=1) == b.argmax(axis=1)).mean() >= top1
    return rel


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_prepared, dataset_dir) -> Path:
    """A finished `quantloop run` on the tiny model and its MLflow store (report_helpers.finished_run_folder), made once
    per session for the run report and MLflow UI tests."""
    from report_helpers import finished_run_folder

    return finished_run_folder(tmp_path_factory.getbasetemp(), tiny_prepared, dataset_dir)
