"""lm-evaluation-harness scoring on quantloop's runtimes: an `LM` whose log-likelihoods come from llama.cpp (the
runtime quantloop validates GGUF files with) or from transformers (the float model).

lm-eval's TemplateLM does the tokenization (the context/continuation split of `_encode_pair`: trailing spaces of
the context move to the continuation, the whole string is encoded and split at the context's length; an empty
context is conditioned on the prefix token). What this module adds is the evaluation:

- LlamaCppScorer evaluates each question's shared prefix once for all its choices. One llama.cpp batch holds the
  context tokens, each tagged with every choice's sequence id (a token may belong to several sequences of a
  unified KV cache), then each choice's continuation tokens under its own sequence id; only the rows that predict
  a continuation token are marked as outputs. Several questions share one batch (their sequence ids differ), so a
  decode call runs on a few hundred tokens at once.
- TransformersScorer is the generic, simple path: one forward pass per choice on the float model.

The runners are quantloop.eval.runtimes' LlamaCppRunner and TransformersRunner, taken by what they offer (this
package sits below eval, whose accuracy criterion calls it): `open_lm(path)` opens a model without them.

Both return, per choice, the summed log-probability of the continuation and whether every continuation token is
the argmax (lm-eval's `is_greedy`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from lm_eval.api.model import TemplateLM

from quantloop.models.checkpoints import load_hf_model, load_hf_tokenizer

Group = tuple[list[int], list[list[int]]]  # a context's tokens and the continuations scored after it


def continuation_scores(logits: np.ndarray, cont: list[int]) -> tuple[float, bool]:
    """Summed log-probability of `cont` and whether it is greedy, from the rows of logits that predict it."""
    logits = np.asarray(logits, dtype=np.float64)
    m = logits.max(axis=1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    idx = np.arange(len(cont))
    logp = float((logits[idx, cont] - logz).sum())
    greedy = bool((logits.argmax(axis=1) == np.asarray(cont)).all())
    return logp, greedy


def truncate(context: list[int], cont: list[int], max_length: int) -> list[int]:
    """The context left-truncated the way lm-eval's HFLM does: the model sees at most max_length tokens of
    context + continuation[:-1]."""
    keep = max_length + 1 - len(cont)
    if keep < 1:
        raise ValueError(f"a continuation of {len(cont)} tokens does not fit a context of {max_length}")
    return context[-keep:]


def default_threads() -> int:
    return int(os.environ.get("QUANTLOOP_THREADS", os.cpu_count() or 1))


class TransformersScorer:
    """One forward pass per (context, continuation) on a TransformersRunner: the simple, generic path."""

    def __init__(self, runner, max_length: int = 2048):
        self.runner = runner
        self.max_length = max_length

    def score(self, groups: list[Group]) -> list[list[tuple[float, bool]]]:
        out = []
        for context, conts in groups:
            row = []
            for cont in conts:
                ctx = truncate(context, cont, self.max_length)
                ids = ctx + cont[:-1]
                row.append(continuation_scores(self.runner.logits(ids, start=len(ctx) - 1), cont))
            out.append(row)
        return out


class LlamaCppScorer:
    """Shared-prefix, batched scoring on the model of an open LlamaCppRunner, in a context of its own (a unified
    KV cache with up to n_seq_max sequences and n_batch tokens per decode)."""

    def __init__(self, runner, n_batch: int = 256, n_seq_max: int = 64, threads: int | None = None):
        import llama_cpp  # deferred: llama_cpp
        from llama_cpp._internals import LlamaBatch, LlamaContext  # deferred: llama_cpp

        self.runner = runner
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.n_vocab = runner.n_vocab
        threads = threads or default_threads()
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = p.n_batch = p.n_ubatch = n_batch
        p.n_seq_max = n_seq_max
        p.kv_unified = True  # one cache across sequences: a context token is stored once, seen by every choice
        p.n_threads = p.n_threads_batch = threads
        self._llama_cpp = llama_cpp
        self.ctx = LlamaContext(model=runner.llm._model, params=p, verbose=False)
        self.batch = LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=n_seq_max, verbose=False)

    def _units(self, groups: list[Group]):
        """(group index, choice indices, context, continuations) units that each fit one batch: a question whose
        choices do not fit together is split into several units, each with its own copy of the context."""
        for g, (context, conts) in enumerate(groups):
            unit: list[int] = []
            ctx = context
            for j, cont in enumerate(conts):
                cj = truncate(context, cont, self.n_batch)
                if unit and (len(cj) != len(ctx) or cost(ctx, [conts[i] for i in unit] + [cont]) > self.n_batch
                             or len(unit) >= self.n_seq_max):
                    yield g, unit, ctx, [conts[i] for i in unit]
                    unit = []
                if not unit:
                    ctx = cj
                unit.append(j)
            if unit:
                yield g, unit, ctx, [conts[i] for i in unit]

    def score(self, groups: list[Group]) -> list[list[tuple[float, bool]]]:
        out: list[list[tuple[float, bool] | None]] = [[None] * len(conts) for _, conts in groups]
        pack: list = []
        tokens = seqs = 0
        for unit in self._units(groups):
            t, s = cost(unit[2], unit[3]), len(unit[1])
            if pack and (tokens + t > self.n_batch or seqs + s > self.n_seq_max):
                self._decode(pack, out)
                pack, tokens, seqs = [], 0, 0
            pack.append(unit)
            tokens += t
            seqs += s
        if pack:
            self._decode(pack, out)
        return out  # type: ignore[return-value]

    def _decode(self, pack: list, out: list) -> None:
        llama_cpp = self._llama_cpp
        llama_cpp.llama_memory_clear(self.ctx.memory, True)
        b = self.batch.batch
        n = 0
        s0 = 0
        reads = []  # (group, choice, first output row, continuation)
        row = 0
        for g, choices, ctx, conts in pack:
            seqs = range(s0, s0 + len(conts))
            s0 += len(conts)
            last = len(ctx) - 1
            for i, t in enumerate(ctx):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = t, i, len(seqs), i == last
                for k, s in enumerate(seqs):
                    b.seq_id[n][k] = s
                n += 1
            shared_row = row  # the last context token predicts every continuation's first token
            row += 1
            for s, j, cont in zip(seqs, choices, conts):
                rows = [shared_row]
                for i, t in enumerate(cont[:-1]):
                    b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = t, len(ctx) + i, 1, True
                    b.seq_id[n][0] = s
                    rows.append(row)
                    row += 1
                    n += 1
                reads.append((g, j, rows, cont))
        b.n_tokens = n
        self.ctx.decode(self.batch)
        logits = np.ctypeslib.as_array(self.ctx.get_logits(), shape=(row * self.n_vocab,)).reshape(row, self.n_vocab)
        for g, j, rows, cont in reads:
            out[g][j] = continuation_scores(logits[rows], cont)

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()


def cost(context: list[int], conts: list[list[int]]) -> int:
    """Tokens one unit puts in a batch: the context once, each continuation but its last token."""
    return len(context) + sum(len(c) - 1 for c in conts)


class QuantloopLM(TemplateLM):
    """lm-eval's LM on a quantloop runner: multiple-choice log-likelihoods (shared prefix, batched on llama.cpp)
    and greedy generation. Open it with `open_lm(path)` or from a runner you already hold."""

    def __init__(self, runner, **scorer_args):
        """`runner`: a LlamaCppRunner (runtime 'llama.cpp') or a TransformersRunner (runtime 'transformers')."""
        super().__init__()
        self.runner = runner
        if runner.runtime == "llama.cpp":
            self.scorer = LlamaCppScorer(runner, **scorer_args)
            self._eot = int(runner.llm.token_eos())
            bos = int(runner.llm.token_bos())
            self._prefix = bos if bos >= 0 else self._eot
        else:
            self.scorer = TransformersScorer(runner, **scorer_args)
            tok = runner.tokenizer
            self._eot = int(tok.eos_token_id)
            self._prefix = int(tok.bos_token_id) if tok.bos_token_id is not None else self._eot

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:  # as HFLM: the BOS token when there is one, else EOS
        return self._prefix

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.runner.tokenize(string)

    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """lm-eval's tokenization of the requests, without its progress bar (quantloop prints a line per task)."""
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Requests grouped by their context tokens (a question's choices share one), scored group by group."""
        index: dict[tuple[int, ...], int] = {}
        groups: list[Group] = []
        where = []
        for _, context, cont in requests:
            key = tuple(context)
            if key not in index:
                index[key] = len(groups)
                groups.append((list(context), []))
            g = index[key]
            where.append((g, len(groups[g][1])))
            groups[g][1].append(list(cont))
        scores = self.scorer.score(groups)
        return [scores[g][j] for g, j in where]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("quantloop scores multiple-choice tasks; perplexity is measured by quantloop.eval.perplexity")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tok_encode(context)
            text = self.runner.detokenize(self.runner.generate_greedy(ids, int(gen_kwargs.get("max_gen_toks", 256))))
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text)
        return out

    def close(self) -> None:
        if isinstance(self.scorer, LlamaCppScorer):
            self.scorer.close()


class GgufModel:
    """A GGUF file opened in llama.cpp with what QuantloopLM uses of a LlamaCppRunner."""

    runtime = "llama.cpp"

    def __init__(self, gguf: str | Path, threads: int | None = None):
        from llama_cpp import Llama  # deferred: llama_cpp

        self.gguf = Path(gguf)
        threads = threads or default_threads()
        self.llm = Llama(model_path=str(self.gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
        self.n_vocab = int(self.llm.n_vocab())

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        out = []
        for tok in self.llm.generate(prompt_ids, temp=0.0, reset=True):
            if tok == self.llm.token_eos() or len(out) >= max_new_tokens:
                break
            out.append(int(tok))
        return out

    def close(self) -> None:
        self.llm.close()


class HfModel:
    """An HF checkpoint folder in transformers (float32, CPU) with what QuantloopLM uses of a TransformersRunner."""

    runtime = "transformers"

    def __init__(self, hf_dir: str | Path, threads: int | None = None):
        import torch  # deferred: torch

        torch.set_num_threads(threads or default_threads())
        self.model = load_hf_model(Path(hf_dir))
        self.tokenizer = load_hf_tokenizer(Path(hf_dir))
        self.n_vocab = int(self.model.config.vocab_size)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def logits(self, ids, start: int = 0) -> np.ndarray:
        import torch  # deferred: torch

        with torch.no_grad():
            out = self.model(torch.as_tensor([list(ids)]), use_cache=False, logits_to_keep=len(ids) - start).logits[0]
        return out.float().numpy()[:, : self.n_vocab]

    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        import torch  # deferred: torch

        x = torch.as_tensor([prompt_ids])
        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=eos)
        new = out[0, len(prompt_ids):].tolist()
        return new[: new.index(eos)] if eos in new else new


def open_lm(model: str | Path, threads: int | None = None, **scorer_args) -> QuantloopLM:
    """A QuantloopLM on a .gguf file (llama.cpp) or an HF checkpoint folder (transformers, float)."""
    path = Path(model)
    runner = GgufModel(path, threads) if path.suffix == ".gguf" else HfModel(path, threads)
    return QuantloopLM(runner, **scorer_args)
