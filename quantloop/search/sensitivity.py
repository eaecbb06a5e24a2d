"""Per-tensor sensitivity: quantize one unit (a tensor, or a layer x module group) at one GGUF type while the
rest of the model stays float, and measure the mean KL divergence of the model's next-token distribution
against the float model on calibration text (full vocabulary, real forward passes in transformers).

The weights are put on the type's exact grid by quantloop.gguf.blocks.fake_quantize (llama.cpp's own
rounding, from the F16 values the GGUF holds). Every measurement is written to a cache file keyed by the
model's weights and the text (each row further keyed by unit and type), so a later call, or a search, reuses
it (as ExLlamaV3 reuses its measurement file); an interrupted run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from quantloop.errors import InputError
from quantloop.fileio import write_json_atomic
from quantloop.search.schemas import SensitivityRequest, SensitivityResult, SensitivityRow, TextSpec
from quantloop.search.tensors import FLOAT16, ModelTensors, TensorInfo, model_tensors, tensor_bytes


def unit_group(t: TensorInfo, granularity: str) -> str:
    return t.block if granularity == "block" else t.group


def units_of(mt: ModelTensors, granularity: str) -> dict[str, list[TensorInfo]]:
    """Unit name -> its tensors: every tensor alone, the tensors of one layer x module group (q/k/v, o, gate/up,
    down), or of one layer x block (attention, feed-forward)."""
    out: dict[str, list[TensorInfo]] = {}
    for t in mt.tensors:
        name = t.name if granularity == "tensor" or t.layer < 0 else f"blk.{t.layer}.{unit_group(t, granularity)}"
        out.setdefault(name, []).append(t)
    return out


def text_chunks(spec: TextSpec, tokenizer) -> tuple[list[np.ndarray], str]:
    """`chunks` windows of `seqlen` tokens from the split, and a digest of the text and the cut."""
    from quantloop.data.datasets import manifest_digest, read_split
    from quantloop.eval.perplexity import make_chunks

    d = Path(spec.dataset_dir)
    if not (d / "manifest.json").is_file():
        raise InputError(d, "not a prepared dataset (no manifest.json)", "run `quantloop prepare --text PATH` first")
    ids = tokenizer(read_split(d, spec.split), add_special_tokens=False)["input_ids"]
    chunks = make_chunks(ids, spec.seqlen, spec.chunks)
    if len(chunks) < spec.chunks:
        raise InputError(d, f"the {spec.split} split holds {len(ids)} tokens, fewer than {spec.chunks} x {spec.seqlen}",
                         "ask for fewer or shorter chunks")
    digest = f"{manifest_digest(d)}:{spec.split}:{spec.chunks}x{spec.seqlen}"
    return chunks, digest


def weights_fingerprint(hf_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(hf_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
        with open(f, "rb") as fh:  # header + first MiB: names, shapes and the first weights
            h.update(fh.read(1 << 20))
            fh.seek(max(st.st_size - (1 << 20), 0))
            h.update(fh.read())
    return h.hexdigest()[:16]


class KLDProbe:
    """A float transformers model with its float log-probabilities on fixed chunks; measures the KLD of
    the model with some weights replaced."""

    def __init__(self, hf_dir: Path, text: list[TextSpec], threads: int | None = None):
        import torch

        from quantloop.eval.runtimes import default_threads
        from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer

        torch.set_num_threads(threads or default_threads())
        self.model = load_hf_model(hf_dir, dtype=torch.float32)
        self.params = dict(self.model.named_parameters())
        if "lm_head.weight" not in self.params and self.model.get_output_embeddings() is not None:
            self.params["lm_head.weight"] = self.model.get_output_embeddings().weight
        tok = load_hf_tokenizer(hf_dir)
        self.chunks, digests = [], []
        for spec in text:
            c, d = text_chunks(spec, tok)
            self.chunks += c
            digests.append(d)
        self.text_digest = "|".join(digests)
        self.layers = list(self.model.model.layers)
        self.inputs: list[list] = []  # per chunk: (hidden state entering every decoder layer, the layers' kwargs)
        self.base = [self._logprobs(c, capture=True) for c in self.chunks]

    def _logprobs(self, chunk: np.ndarray, capture: bool = False):
        import torch

        seen: list = []
        hooks = [layer.register_forward_pre_hook(lambda mod, args, kw: seen.append((args[0].detach().clone(), kw)), with_kwargs=True)
                 for layer in self.layers] if capture else []
        try:
            with torch.no_grad():
                logits = self.model(torch.as_tensor(np.asarray(chunk, dtype=np.int64))[None], use_cache=False).logits[0]
        finally:
            for h in hooks:
                h.remove()
        if capture:
            self.inputs.append(seen)
        return torch.log_softmax(logits.float(), dim=-1)

    def _logprobs_from(self, i: int, start: int):
        """Log-probabilities of chunk i running only decoder layers start.. (the float inputs of layer `start` are cached)."""
        import torch

        h, kw = self.inputs[i][start]
        with torch.no_grad():
            for layer in self.layers[start:]:
                h = layer(h, **kw)
            logits = self.model.lm_head(self.model.model.norm(h))[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def kld(self, replaced: dict[str, np.ndarray], start_layer: int | None = None) -> float:
        """Mean KLD(float || model with `replaced` weights) over every position of every chunk. With start_layer,
        the replaced weights must lie in decoder layers >= start_layer, and the layers below it are not run again."""
        import torch

        saved = {}
        try:
            for name, w in replaced.items():
                p = self.params[name]
                saved[name] = p.data.clone()
                p.data.copy_(torch.from_numpy(w).reshape(p.shape))
            total, n = 0.0, 0
            for i, (chunk, lb) in enumerate(zip(self.chunks, self.base)):
                lq = self._logprobs(chunk) if start_layer is None else self._logprobs_from(i, start_layer)
                total += float((lb.exp() * (lb - lq)).sum(-1).clamp_min(0).sum())
                n += lb.shape[0]
            return total / n
        finally:
            for name, w in saved.items():
                self.params[name].data.copy_(w)

    def weight(self, name: str) -> np.ndarray:
        return self.params[name].detach().float().numpy()


def fake_quantized(w: np.ndarray, type_name: str) -> np.ndarray:
    """The weights as llama-quantize stores them at `type_name`: rounded to F16 first (what the GGUF holds), then
    quantized on the type's grid by llama.cpp's rounding."""
    from quantloop.gguf.blocks import fake_quantize

    w16 = w.astype(np.float16).astype(np.float32)
    if type_name == FLOAT16:
        return w16
    return np.asarray(fake_quantize(w16, type_name), dtype=np.float32).reshape(w.shape)


def cache_key(weights: str, text_digest: str, granularity: str) -> str:
    return hashlib.sha256(json.dumps([weights, text_digest, granularity]).encode()).hexdigest()[:20]


def measure_sensitivity(req: SensitivityRequest, progress=None) -> SensitivityResult:
    """The sensitivity table of `req.model` (cached rows reused; new rows written to the cache as they are measured)."""
    from quantloop.models.checkpoints import resolve_model
    from quantloop.paths import CACHE_DIR

    t0 = time.perf_counter()
    model = resolve_model(req.model)
    if model.hf_dir is None or model.gguf is None:
        raise InputError(model.path, "sensitivity needs a prepared checkpoint (transformers + F16 GGUF)", "run `quantloop prepare` on it first")
    if not req.text:
        raise InputError(None, "no calibration text given", "name at least one prepared dataset")
    mt = model_tensors(model.gguf, tuple(req.types) + (FLOAT16,))
    units = units_of(mt, req.granularity)
    probe = None
    weights = weights_fingerprint(model.hf_dir)
    text_digest = "|".join(f"{Path(s.dataset_dir).resolve()}:{s.split}:{s.chunks}x{s.seqlen}" for s in req.text)
    from quantloop.data.datasets import manifest_digest

    text_digest += "|" + "|".join(manifest_digest(Path(s.dataset_dir)) for s in req.text
                                  if (Path(s.dataset_dir) / "manifest.json").is_file())
    key = cache_key(weights, text_digest, req.granularity)
    cache_file = Path(req.cache_dir or CACHE_DIR / "sensitivity") / f"{key}.json"
    cache = json.loads(cache_file.read_text())["kld"] if cache_file.is_file() else {}
    rows, measured = [], 0
    todo = [(u, ts, t) for u, ts in units.items() for t in ts[0].types if t != FLOAT16]
    for i, (unit, ts, typ) in enumerate(todo):
        k = f"{unit}|{typ}"
        if k not in cache:
            if probe is None:
                probe = KLDProbe(model.hf_dir, req.text, req.threads)
            start = min(t.layer for t in ts)
            cache[k] = probe.kld({t.hf_name: fake_quantized(probe.weight(t.hf_name), typ) for t in ts}, start if start >= 0 else None)
            measured += 1
            write_json_atomic(cache_file, {"model": str(model.path), "weights": weights, "text": text_digest,
                                           "granularity": req.granularity, "kld": cache})
            if progress is not None:
                progress(i + 1, len(todo), unit, typ, cache[k])
        rows.append(SensitivityRow(unit=unit, tensors=[t.name for t in ts], layer=ts[0].layer, group=unit_group(ts[0], req.granularity),
                                   n_weights=sum(t.n_weights for t in ts), type=typ,
                                   bytes=sum(tensor_bytes(t.n_weights, typ, mt.alignment) for t in ts), kld=cache[k]))
    return SensitivityResult(model=str(model.path), key=key, cache_file=str(cache_file), rows=rows, measured=measured,
                             wall_s=time.perf_counter() - t0)
