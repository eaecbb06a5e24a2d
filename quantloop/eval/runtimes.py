"""One small interface over the two runtimes quantloop measures on.

- TransformersRunner: an HF checkpoint in float32 (CPU, or CUDA when present).
- LlamaCppRunner: a GGUF file in llama.cpp through llama-cpp-python (CPU).

Both return raw logits over the full vocabulary for a list of token ids
(evaluated from an empty cache) and greedy continuations.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from quantloop.errors import InputError
from quantloop.gguf.llamacpp import file_type_name, read_metadata
from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer
from quantloop.schemas import ModelRef


def default_threads() -> int:
    return int(os.environ.get("QUANTLOOP_THREADS", os.cpu_count() or 1))


class TransformersRunner:
    runtime = "transformers"

    def __init__(self, hf_dir: str | Path, device: str | None = None, threads: int | None = None):
        import torch  # deferred: torch


        torch.set_num_threads(threads or default_threads())
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.hf_dir = Path(hf_dir)
        self.model = load_hf_model(self.hf_dir, device=self.device)
        self.tokenizer = load_hf_tokenizer(self.hf_dir)
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.ref = ModelRef(path=str(self.hf_dir), runtime="transformers", format=f"hf-{dtype}")
        self.n_vocab = int(self.model.config.vocab_size)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {int(e) for e in eos if e is not None}
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(int(self.tokenizer.eos_token_id))

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def logits(self, ids, start: int = 0) -> np.ndarray:
        """Logits at positions start..len(ids)-1 (the output head runs only there)."""
        import torch  # deferred: torch

        x = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)[None]
        with torch.no_grad():
            out = self.model(x, use_cache=False, logits_to_keep=len(ids) - start).logits[0]
        return out.float().cpu().numpy()[:, : self.n_vocab]

    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        import torch  # deferred: torch

        x = torch.as_tensor([prompt_ids], device=self.device)
        with torch.no_grad():
            out = self.model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=sorted(self.eos) or None, pad_token_id=sorted(self.eos)[0] if self.eos else 0,
            )
        new = out[0, len(prompt_ids):].tolist()
        for i, t in enumerate(new):
            if t in self.eos:
                return new[:i]
        return new


class LlamaCppRunner:
    runtime = "llama.cpp"

    def __init__(self, gguf: str | Path, n_ctx: int = 512, threads: int | None = None):
        from llama_cpp import Llama  # deferred: llama_cpp

        self.gguf = Path(gguf)
        meta = read_metadata(self.gguf)
        threads = threads or default_threads()
        try:
            self.llm = Llama(
                model_path=str(self.gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False, seed=0,
            )
        except (ValueError, RuntimeError) as e:
            raise InputError(
                self.gguf,
                f"llama.cpp cannot load this model (architecture '{meta.architecture}'): {str(e)[:120]}",
                "use a GGUF of an architecture llama.cpp supports",
            ) from None
        self.n_ctx = n_ctx
        self.ref = ModelRef(path=str(self.gguf), runtime="llama.cpp", format=f"gguf:{file_type_name(meta.file_type) or 'unknown'}")
        self.n_vocab = int(self.llm.n_vocab())
        self.eos = {int(self.llm.token_eos())}

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def logits(self, ids, start: int = 0) -> np.ndarray:
        """Logits at positions start..len(ids)-1, from an empty cache. Only those positions are marked as outputs
        of the batch, so llama.cpp runs the output head (vocabulary x width, the largest matmul of a small model
        with a big vocabulary) only there, and only those rows are copied out."""
        ids = [int(t) for t in ids]
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        if not 0 <= start < len(ids):
            raise ValueError(f"start {start} outside 0..{len(ids) - 1}")
        llm = self.llm  # llama-cpp-python's eval marks every position (logits_all) or the last; this marks a range
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm._batch.set_batch(batch=ids, n_past=0, logits_all=False)
        for i in range(start, len(ids)):
            llm._batch.batch.logits[i] = True
        llm._ctx.decode(llm._batch)
        rows = len(ids) - start
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(rows * self.n_vocab,)).reshape(rows, self.n_vocab).copy()

    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        self.llm.reset()
        self.llm.eval([int(t) for t in prompt_ids])
        new: list[int] = []
        for _ in range(max_new_tokens):
            if self.llm.n_tokens >= self.n_ctx:
                break
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if tok in self.eos:
                break
            new.append(tok)
            self.llm.eval([tok])
        return new

    def close(self) -> None:
        self.llm.close()
