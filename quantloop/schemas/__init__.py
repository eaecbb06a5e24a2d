"""Pydantic models shared by tools, agents, reports and the CLI.

Every report quantloop writes is one of these models serialised to JSON. The settings of one quantization
attempt (QuantSpec, a model per method) live in quant_spec.py, re-exported here.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from quantloop import __version__
from quantloop.schemas.base import Strict
from quantloop.schemas.quant_spec import (  # noqa: F401 (the quantization settings, one model per method)
    METHODS,
    SPEC_MODELS,
    AutoRoundSpec,
    AWQSpec,
    CalibrationSpec,
    GGUFSpec,
    GPTQSpec,
    Needs,
    QATSpec,
    QuantMethod,
    QuantSpec,
    RTNSpec,
    SpecBase,
    parse_spec,
    quant_spec,
    register_spec,
    spec_type,
)

Runtime = Literal["transformers", "llama.cpp"]


# --------------------------------------------------------------------------- specs


QualityRule = Literal["perplexity", "accuracy", "either", "both"]


class AccuracySettings(Strict):
    """The benchmark accuracy bar: the paired drop of the quantized model against the float baseline on the same items."""

    tasks: list[str] = Field(default_factory=lambda: ["standard", "os"], min_length=1,
                             description="benchmark tasks or groups (quantloop benchmarks --list)")
    max_drop_pp: float = Field(2.0, gt=0, description="accuracy drop vs the float baseline, percentage points, on every task")
    items: int = Field(200, ge=10, description="items scored per task first (the same items for both models)")
    max_items: int | None = Field(800, ge=10, description="a drop within decide_sigmas standard errors of its bar doubles its "
                                  "items up to this many before the verdict (default: items, no more)")
    min_above_chance_pp: float = Field(5.0, ge=0, description="a task the float model does not beat chance on by this many "
                                       "points (and 2 standard errors) says nothing about degradation: reported, not judged")
    measure_all: bool = Field(False, description="measure every task even after one has failed the bar (default: the "
                              "tasks after a failure cannot change the verdict and are reported as not measured)")


class AcceptanceCriteria(Strict):
    """The acceptance bar from specs/acceptance.yaml (seed 003)."""

    max_ppl_increase_pct: float = Field(2.0, gt=0, description="perplexity increase vs the float baseline, percent")
    min_speedup: float = Field(1.5, gt=0, description="token-generation speed vs the float baseline on the same runtime")
    min_size_ratio: dict[int, float] = Field(
        default_factory=lambda: {4: 3.5, 8: 1.8},
        description="float bytes / quantized bytes required for a nominal bit width ('about 4x' at INT4, 'about 2x' at INT8)",
    )
    no_generation_failures: bool = True
    accuracy: AccuracySettings | None = Field(None, description="the benchmark accuracy bar (quantloop/benchmarks); none: not measured")
    quality: QualityRule = Field("either", description="which quality bar must hold: perplexity, accuracy, either (seed 003's "
                                 "'perplexity increase < 2 % OR accuracy drop < 2 points') or both; both are measured and "
                                 "reported whenever the spec has an accuracy section")

    @model_validator(mode="after")
    def _rule_has_its_bar(self):
        if self.quality in ("accuracy", "both") and self.accuracy is None:
            raise ValueError(f"quality: {self.quality} needs an accuracy section (tasks, max_drop_pp, ...)")
        return self


class EvalSettings(Strict):
    context: int = Field(512, ge=16, description="tokens per chunk; each chunk scores its second half")
    chunks: int = Field(16, ge=1, description="chunks of the test split scored (the first N)")
    max_chunks: int | None = Field(None, ge=1, description="when the perplexity increase lies within decide_sigmas standard "
                                   "errors of its bar, the chunks double up to this many before the verdict (default: no more)")
    decide_sigmas: float = Field(2.0, gt=0, description="a measurement this many standard errors or more from its bar decides")
    sequential: bool = Field(True, description="measure in rounds and stop each bar at the first look that decides it, with "
                             "the boundary raised for the number of looks (eval/sequential.py); false: the first `chunks` "
                             "chunks, doubled up to max_chunks while within decide_sigmas of the bar")
    first_chunks: int = Field(4, ge=1, description="sequential: chunks at the first look of each text; the looks double up to "
                              "max_chunks (or chunks)")


class SpeedSettings(Strict):
    prompt_tokens: int = Field(256, ge=8)
    gen_tokens: int = Field(128, ge=4)
    repeats: int = Field(5, ge=1, description="float/quantized pairs, interleaved; the verdict takes the median pair ratio")
    bench_reps: int = Field(2, ge=1, description="llama-bench repetitions inside each run (-r)")
    max_repeats: int | None = Field(None, ge=1, description="pairs at most: more are measured while the median ratio lies "
                                    "within decide_sigmas standard errors of the bar (default: repeats, no more)")
    threads: int | None = Field(None, ge=1, description="threads of every speed run, float and quantized alike (default: "
                                "QUANTLOOP_THREADS, else every core)")
    between_run_sd_pct: float = Field(0.0, ge=0, description="how much the ratio moves between validations on this machine "
                                      "beyond the spread of the pairs within one (relative standard deviation, %, measured "
                                      "by bench/bench_speed_verdict.py); added in quadrature to the standard error")


class GenerationSettings(Strict):
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(48, ge=4)
    ngram: int = Field(4, ge=2)
    max_repeated_ngram_rate: float = Field(0.5, gt=0, le=1)
    max_nonsense_ppl: float = Field(100.0, gt=1)
    min_new_tokens: int = Field(4, ge=1, description="fewer generated tokens than this counts as empty output")
    float_loop_margin: float = Field(0.15, ge=0, le=1, description="a quantized model's repetition loop is the float "
                                     "model's own when the float model's continuation of the same prompt repeats at least "
                                     "max_repeated_ngram_rate less this much: greedy continuations of two near-identical "
                                     "models part after a few tokens, and a loop-prone prompt loops a little more or less")
    same_loop_share: float = Field(0.5, ge=0, le=1, description="and only when at least this share of the quantized "
                                   "continuation's repeated n-grams occur in the float continuation: the same loop, not "
                                   "a loop of its own on a prompt the float model happens to loop on")


class QualitySpec(Strict):
    """specs/acceptance.yaml as a whole."""

    acceptance: AcceptanceCriteria = Field(default_factory=AcceptanceCriteria)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    speed: SpeedSettings = Field(default_factory=SpeedSettings)
    generation: GenerationSettings


# --------------------------------------------------------------------------- data


class SplitInfo(Strict):
    file: str
    sha256: str
    documents: list[str]
    n_documents: int
    n_chars: int
    n_tokens: int | None = None
    tokenizer: str | None = None


class DatasetManifest(Strict):
    source: str
    source_detail: str
    created: str
    splits: dict[str, SplitInfo]


# --------------------------------------------------------------------------- models


class ModelManifest(Strict):
    """Written by `quantloop prepare` next to a prepared checkpoint."""

    name: str
    source: str
    source_sha256: str | None = None
    hf_dir: str
    gguf_f16: str | None = None
    dtype: str = "float32"
    architecture: str
    n_params: int
    reference_note: str
    created: str


class ModelRef(Strict):
    path: str
    runtime: Runtime
    format: str = Field(description="e.g. hf-float32, gguf:F16, gguf:Q4_K_M")


# --------------------------------------------------------------------------- measurements


class PerplexityReport(Strict):
    model: ModelRef
    context: int
    chunks: int
    tokens_scored: int
    ppl: float
    ppl_stderr: float
    mean_nll: float


class Percentiles(Strict):
    max: float
    p99_9: float
    p99: float
    p95: float
    p90: float
    median: float
    p10: float
    p5: float
    p1: float
    p0_1: float
    min: float


class KLDReport(Strict):
    """Same statistics as llama-perplexity --kl-divergence, full vocabulary."""

    tokens: int
    ppl_base: float
    ppl_quant: float
    ln_ppl_ratio: float
    ln_ppl_ratio_stderr: float
    ppl_ratio: float
    ppl_increase_pct: float
    kld_mean: float
    kld_mean_stderr: float
    kld: Percentiles
    delta_p_mean: float = Field(description="mean of p_quant(correct) - p_base(correct)")
    delta_p_mean_stderr: float
    delta_p: Percentiles
    rms_delta_p: float
    rms_delta_p_stderr: float
    same_top_rate: float
    same_top_rate_stderr: float


class SpeedReport(Strict):
    model: ModelRef
    threads: int
    prompt_tokens: int
    gen_tokens: int
    pp_tokens_per_s: float
    tg_tokens_per_s: float
    load_s: float | None = Field(description="model load time; None on llama.cpp (llama-bench does not report it)")
    peak_rss_bytes: int


class SizeReport(Strict):
    path: str
    bytes_on_disk: int
    n_weights: int
    bits_per_weight: float = Field(description="8 * tensor bytes / weights, over all weights")
    n_linear_weights: int
    linear_bits_per_weight: float = Field(description="over the linear (attention and feed-forward) weights alone")
    tensor_types: dict[str, int] = Field(description="weights per storage type")
    linear_tensor_types: dict[str, int] = Field(default_factory=dict, description="linear weights per storage type")


class GenerationSample(Strict):
    prompt: str
    output: str
    new_tokens: int
    repeated_ngram_rate: float
    float_ppl: float | None
    failures: list[str]
    float_failures: list[str] = Field(default_factory=list, description="failures the float model's own continuation shows too (not counted)")


class GenerationReport(Strict):
    model: ModelRef
    samples: list[GenerationSample]
    failures: int
    passed: bool


class CriterionResult(Strict):
    name: str
    passed: bool
    measured: float | None
    threshold: str
    detail: str
    margin_sigmas: float | None = Field(None, description="(measured - bar) / its standard error, signed so that > 0 passes")
    binding: bool = Field(True, description="whether the result can decide the verdict (false: reported only, e.g. a "
                          "benchmark the float model does not beat chance on)")

    @model_serializer(mode="wrap")
    def _binding_only_when_not(self, handler):
        """A binding result (every one before the accuracy bar) reads as it always did (no 'binding' key)."""
        data = handler(self)
        if isinstance(data, dict) and data.get("binding") is True:
            data.pop("binding")
        return data


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class EvaluationReport(Strict):
    """`quantloop evaluate`: one model measured on its own (a float baseline report)."""

    quantloop_version: str = __version__
    created: str = Field(default_factory=_now)
    reference_note: str
    dataset: str
    perplexity: list[PerplexityReport]
    speed: list[SpeedReport]
    size: SizeReport
    generation: GenerationReport | None


class ValidationRequest(Strict):
    """Input of the validate_quantization tool."""

    quantized: str = Field(description="quantized model: a .gguf file, or a directory holding one")
    baseline: str = Field(description="float baseline: a prepared checkpoint directory or an F16/F32 .gguf")
    nominal_bits: int | None = Field(None, ge=2, le=16, description="bit width the size criterion uses; read from the GGUF file type when omitted")
    dataset_dir: str | None = None
    spec_file: str | None = None
    report_path: str | None = Field(None, description="where validation_report.json goes; default: next to the quantized model")
    chunks: int | None = Field(None, ge=1)
    held_out: list[str] = Field(default_factory=list, description="more prepared datasets (names under SLM/datasets, or folders) "
                                "whose test split is scored too; each must meet the perplexity bar")
    held_out_chunks: int | None = Field(None, ge=1, description="chunks per held-out dataset, more while within the noise of "
                                        "the bar (default: chunks)")
    check_generation: bool = True
    measure_speed: bool = True
    full_report: bool = Field(False, description="measure every criterion even after the attempt has failed one (default: "
                              "a criterion that cannot change the verdict any more is reported as not measured)")


class ValidationReport(Strict):
    quantloop_version: str = __version__
    created: str = Field(default_factory=_now)
    reference_note: str
    runtime: Runtime
    dataset: str
    baseline: ModelRef
    quantized: ModelRef
    nominal_bits: int | None
    acceptance: AcceptanceCriteria
    kld: KLDReport
    held_out_kld: dict[str, KLDReport] = Field(default_factory=dict, description="the same measurement on each held-out domain's test split")
    speed_baseline: SpeedReport | None
    speed_quantized: SpeedReport | None
    speedup_pp: float | None
    speedup_tg: float | None = Field(description="median over the interleaved float/quantized pairs of tg ratios")
    speedup_tg_pairs: list[float] = Field(default_factory=list, description="every pair's token-generation ratio, in order")
    speedup_tg_stderr: float | None = Field(None, description="standard error of the median ratio (1.2533 * sd / sqrt(n))")
    size_baseline: SizeReport
    size_quantized: SizeReport
    size_ratio: float
    generation: GenerationReport | None
    criteria: list[CriterionResult]
    passed: bool
    carried_by: list[str] = Field(default_factory=list, description="the quality bars the verdict rests on (acceptance.quality)")
    report_path: str | None = None
    measurements: dict[str, dict] = Field(default_factory=dict, description="what a criterion beyond the built-in ones measured "
                                          "itself (its measure()), by its name; written only when there is one")

    @model_serializer(mode="wrap")
    def _without_empty_measurements(self, handler):
        """A report without such a measurement reads as it always did (no 'measurements' key)."""
        data = handler(self)
        if isinstance(data, dict) and not data.get("measurements"):
            data.pop("measurements", None)
        if isinstance(data, dict) and not data.get("carried_by"):
            data.pop("carried_by", None)
        return data


class CompareRequest(Strict):
    model_a: str
    model_b: str
    prompts: list[str] | None = None
    max_new_tokens: int = Field(48, ge=1)
    spec_file: str | None = None


class CompareRow(Strict):
    prompt: str
    output_a: str
    output_b: str
    identical: bool


class CompareReport(Strict):
    model_a: ModelRef
    model_b: ModelRef
    rows: list[CompareRow]
    identical_rate: float
    markdown: str

    @field_validator("identical_rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        return round(v, 6)


class EvaluateRequest(Strict):
    """Input of the evaluate_model tool."""

    model: str
    dataset_dir: str | None = None
    spec_file: str | None = None
    runtimes: list[Runtime] | None = Field(None, description="default: every runtime the model has files for")
    chunks: int | None = Field(None, ge=1)
    measure_speed: bool = True
    check_generation: bool = True


# --------------------------------------------------------------------------- quantization


class QuantizationResult(Strict):
    """What every backend returns (the same fields, so the agents can compare them)."""

    spec: QuantSpec
    output_dir: str
    model_path: str = Field(description="the file or folder a runtime loads")
    format: str = Field(description="gguf:<TYPE>, or the HF format name (gptq, awq, hf-float32 fake-quant, ...)")
    wall_s: float
    peak_rss_bytes: int
    bytes_on_disk: int
    bits_per_weight: float
    linear_bits_per_weight: float
    libraries: dict[str, str]
    calibration_manifest_sha256: str | None = None
    notes: list[str] = Field(default_factory=list, description="one line each: what the quantizer changed on its own "
                             "(e.g. llama.cpp's fallback types for rows a block does not divide)")
