"""Generation-failure checks on a fixed prompt set (thresholds in specs/acceptance.yaml).

For each prompt the model continues greedily; the continuation fails if it is
- empty: fewer than `min_new_tokens` tokens, or only whitespace;
- a repetition loop: the share of its n-grams already seen earlier in the
  same continuation is above `max_repeated_ngram_rate`;
- nonsense: the float model's perplexity of the continuation (given the
  prompt) is above `max_nonsense_ppl`.

A quantized model is judged against its float model: a failure the float model's own
continuation of the same prompt shows too (an undertrained model that loops, say) is
reported in `float_failures` and not counted against the quantization. For loops the float
model's continuation counts as one from `float_loop_margin` below the threshold: the greedy
continuations of two near-identical models part after a few tokens, and a prompt the float
model loops on at 51 % (SmolLM2-135M: "The sun rises in the east and") loops at 69 % on its
Q8_0 file, a loop of the same kind, not damage. It must be the same loop: at least
`same_loop_share` of the repeated n-grams occur in the float continuation (1.0 for that Q8_0
file, 0.0 for a model with random weights that loops on the same prompt).
"""

from __future__ import annotations

import numpy as np

from quantloop.eval.perplexity import log_softmax
from quantloop.schemas import GenerationReport, GenerationSample, GenerationSettings


def ngrams(tokens: list[int], n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngrams(tokens: list[int], n: int) -> list[tuple]:
    """Each n-gram occurrence already seen earlier in `tokens`."""
    seen: set = set()
    repeats = []
    for g in ngrams(tokens, n):
        if g in seen:
            repeats.append(g)
        seen.add(g)
    return repeats


def repeated_ngram_rate(tokens: list[int], n: int) -> float:
    n_grams = len(tokens) - n + 1
    return len(repeated_ngrams(tokens, n)) / n_grams if n_grams > 0 else 0.0


def same_loop(new: list[int], ref: list[int], settings: GenerationSettings) -> bool:
    """Whether the loop in `new` is the float continuation's `ref`: enough of its repeated n-grams occur in `ref`."""
    repeats = set(repeated_ngrams(new, settings.ngram))
    shared = repeats & set(ngrams(ref, settings.ngram))
    return bool(repeats) and len(shared) >= settings.same_loop_share * len(repeats)


def continuation_ppl(float_runner, prompt_ids: list[int], new_ids: list[int]) -> float:
    """Perplexity the float model assigns to `new_ids` following `prompt_ids`."""
    ids = list(prompt_ids) + list(new_ids)
    lp = log_softmax(float_runner.logits(ids)[len(prompt_ids) - 1:len(ids) - 1])
    nll = -lp[np.arange(len(new_ids)), new_ids]
    return float(np.exp(nll.mean()))


def _failures(new: list[int], text: str, prompt_ids: list[int], float_runner, settings: GenerationSettings):
    """(failures, repeated n-gram rate, float-model perplexity) of one continuation."""
    failures = []
    if len(new) < settings.min_new_tokens or not text.strip():
        failures.append("empty output")
    rate = repeated_ngram_rate(new, settings.ngram)
    if rate > settings.max_repeated_ngram_rate:
        failures.append(f"repetition loop ({rate:.0%} of {settings.ngram}-grams repeated)")
    ppl = continuation_ppl(float_runner, prompt_ids, new) if new else None
    if ppl is not None and ppl > settings.max_nonsense_ppl:
        failures.append(f"nonsense (float-model perplexity {ppl:.1f})")
    return failures, rate, ppl


def float_settings(settings: GenerationSettings) -> GenerationSettings:
    """The thresholds a float continuation is held to when deciding whether a failure is the float model's own."""
    rate = max(settings.max_repeated_ngram_rate - settings.float_loop_margin, 0.0)
    return settings.model_copy(update={"max_repeated_ngram_rate": rate})


def check_generations(runner, float_runner, settings: GenerationSettings, prompts: list[str] | None = None) -> GenerationReport:
    samples = []
    for prompt in prompts or settings.prompts:
        prompt_ids = float_runner.tokenize(prompt)
        new = runner.generate_greedy(prompt_ids, settings.max_new_tokens)
        text = runner.detokenize(new)
        failures, rate, ppl = _failures(new, text, prompt_ids, float_runner, settings)
        inherited = []
        if failures and runner is not float_runner:
            ref = float_runner.generate_greedy(prompt_ids, settings.max_new_tokens)
            ref_kinds = {f.split()[0] for f in _failures(ref, float_runner.detokenize(ref), prompt_ids, float_runner,
                                                         float_settings(settings))[0]}
            if "repetition" in ref_kinds and not same_loop(new, ref, settings):
                ref_kinds.discard("repetition")
            inherited = [f for f in failures if f.split()[0] in ref_kinds]
            failures = [f for f in failures if f.split()[0] not in ref_kinds]
        samples.append(GenerationSample(prompt=prompt, output=text, new_tokens=len(new), repeated_ngram_rate=rate,
                                        float_ppl=ppl, failures=failures, float_failures=inherited))
    n_fail = sum(1 for s in samples if s.failures)
    return GenerationReport(model=runner.ref, samples=samples, failures=n_fail, passed=n_fail == 0)
