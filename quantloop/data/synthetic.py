"""Self-generated (data-free) calibration text, as in LLM-QAT (Liu et al. 2023).

The float model writes its own calibration data: the first token of every sample is
drawn uniformly from the vocabulary (special tokens excluded), the next
`greedy_tokens` are decoded greedily, and the rest are sampled from the model's own
next-token distribution (at `temperature`). Deterministic for a seed: every random
draw comes from one CPU torch.Generator, in a fixed order.

Public functions:
  generate_synthetic(model, tokenizer_or_vocab_size, n_samples, seqlen, seed, ...) -> list[list[int]]
  cached_synthetic(model_dir, n, seqlen, seed, cache_dir, ...) -> list[list[int]]
      the same, stored as .npy with a JSON manifest (model, seed, n, seqlen, sha256) and reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from quantloop.errors import InputError
from quantloop.fileio import atomic_output
from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer


def _vocab(tokenizer_or_vocab_size, model_vocab: int) -> tuple[int, list[int]]:
    """(usable vocabulary size, ids allowed as first tokens)."""
    if isinstance(tokenizer_or_vocab_size, (int, np.integer)):
        n = int(tokenizer_or_vocab_size)
        special: set[int] = set()
    else:
        tok = tokenizer_or_vocab_size
        n = len(tok)
        special = {int(i) for i in (getattr(tok, "all_special_ids", None) or [])}
    n = min(n, model_vocab)
    if n < 2:
        raise InputError(None, f"vocabulary of {n} tokens is too small to generate calibration text")
    first = [i for i in range(n) if i not in special]
    if not first:
        raise InputError(None, "every token of the vocabulary is a special token")
    return n, first


def generate_synthetic(model, tokenizer_or_vocab_size, n_samples: int, seqlen: int, seed: int,
                       greedy_tokens: int = 3, temperature: float = 1.0, batch_size: int = 16,
                       progress: bool = True) -> list[list[int]]:
    """n_samples sequences of seqlen token ids written by `model` (an HF causal LM).

    Position 0: uniform over the non-special vocabulary; positions 1..greedy_tokens: argmax;
    later positions: sampled from softmax(logits / temperature). Batched with the KV cache.
    """
    import torch  # deferred: torch

    if int(n_samples) < 1 or int(seqlen) < 1:
        raise InputError(None, f"synthetic data needs n_samples >= 1 and seqlen >= 1, not {n_samples} and {seqlen}")
    if temperature <= 0:
        raise InputError(None, f"sampling temperature must be positive, not {temperature}")
    if greedy_tokens < 0:
        raise InputError(None, f"greedy_tokens must be >= 0, not {greedy_tokens}")
    n_samples, seqlen, batch_size = int(n_samples), int(seqlen), max(1, int(batch_size))
    model_vocab = int(model.get_output_embeddings().weight.shape[0])
    vocab, first_ids = _vocab(tokenizer_or_vocab_size, model_vocab)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    first_ids_t = torch.tensor(first_ids, dtype=torch.long)
    firsts = first_ids_t[torch.randint(len(first_ids), (n_samples,), generator=gen)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    bar = tqdm(total=n_samples * seqlen, desc="synthetic data", unit="tok", disable=not progress)
    try:
        with torch.no_grad():
            for start in range(0, n_samples, batch_size):
                ids = firsts[start:start + batch_size].unsqueeze(1)  # (b, 1) on CPU
                past, step_in = None, ids
                bar.update(ids.numel())
                for pos in range(1, seqlen):
                    res = model(input_ids=step_in.to(device), past_key_values=past, use_cache=True)
                    past = res.past_key_values
                    logits = res.logits[:, -1, :vocab].float().cpu()
                    if pos <= greedy_tokens:
                        nxt = logits.argmax(dim=-1, keepdim=True)
                    else:
                        probs = torch.softmax(logits / temperature, dim=-1)
                        nxt = torch.multinomial(probs, 1, generator=gen)
                    ids = torch.cat([ids, nxt], dim=1)
                    step_in = nxt
                    bar.update(nxt.numel())
                out.extend(ids.tolist())
    finally:
        bar.close()
        model.train(was_training)
    return out


def _model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and the weight files' names and sizes (cheap, changes when the model does)."""
    h = hashlib.sha256()
    cfg = model_dir / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def _ids_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.int64).tobytes()).hexdigest()


def cached_synthetic(model_dir, n: int, seqlen: int, seed: int, cache_dir, greedy_tokens: int = 3,
                     temperature: float = 1.0, batch_size: int = 16, device: str | None = None) -> list[list[int]]:
    """generate_synthetic for the HF checkpoint `model_dir`, stored under cache_dir and reused.

    Files: synthetic-<key>.npy (int64, (n, seqlen)) and synthetic-<key>.json, the manifest
    {model, model_fingerprint, seed, n, seqlen, greedy_tokens, temperature, sha256}. A cache
    entry whose array does not match its manifest's sha256 is regenerated.
    """
    model_dir, cache_dir = Path(model_dir), Path(cache_dir)
    if not model_dir.is_dir():
        raise InputError(model_dir, "not a folder", "pass an HF checkpoint folder")
    fingerprint = _model_fingerprint(model_dir)
    params = {"model": str(model_dir.resolve()), "model_fingerprint": fingerprint, "seed": int(seed), "n": int(n),
              "seqlen": int(seqlen), "greedy_tokens": int(greedy_tokens), "temperature": float(temperature)}
    key = hashlib.sha256(json.dumps({k: v for k, v in params.items() if k != "model"}, sort_keys=True).encode()).hexdigest()[:16]
    npy, manifest = cache_dir / f"synthetic-{key}.npy", cache_dir / f"synthetic-{key}.json"
    if npy.is_file() and manifest.is_file():
        try:
            meta = json.loads(manifest.read_text())
            arr = np.load(npy)
            if meta.get("sha256") == _ids_sha256(arr) and arr.shape == (int(n), int(seqlen)):
                return arr.astype(np.int64).tolist()
        except (ValueError, OSError):
            pass  # unreadable entry: regenerate
    import torch  # deferred: torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_hf_model(model_dir, device=dev)
    tok = load_hf_tokenizer(model_dir)
    ids = generate_synthetic(model, tok, n, seqlen, seed, greedy_tokens=greedy_tokens, temperature=temperature,
                             batch_size=batch_size)
    del model
    arr = np.asarray(ids, dtype=np.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(npy) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    with atomic_output(manifest) as tmp:
        Path(tmp).write_text(json.dumps({**params, "sha256": _ids_sha256(arr)}, indent=2) + "\n")
    return ids
