"""Requests and results of the sensitivity and search tools (pydantic in, pydantic out)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantloop.schemas import CalibrationSpec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextSpec(Strict):
    """Token windows cut from one split of one prepared dataset (a 'domain'), or the model's own generations."""

    dataset_dir: str = Field("", description="prepared dataset folder (source 'dataset')")
    split: str = "validation"
    chunks: int = Field(2, ge=1)
    seqlen: int = Field(256, ge=16)
    source: Literal["dataset", "synthetic"] = Field("dataset", description="synthetic: sequences the float model generates "
                                                                           "itself (data-free; cached), no dataset read")

    @model_validator(mode="after")
    def _dataset_named(self):
        if self.source == "dataset" and not self.dataset_dir:
            raise ValueError("dataset_dir is required for source 'dataset'")
        return self


class SensitivityRequest(Strict):
    model: str = Field(description="prepared checkpoint folder (transformers float32 + F16 GGUF)")
    text: list[TextSpec] = Field(description="calibration text: one entry per domain")
    types: list[str] = Field(default_factory=lambda: ["Q4_0", "Q5_0", "Q8_0"], description="candidate GGUF types to measure")
    granularity: str = Field("group", pattern="^(tensor|group|block)$",
                             description="tensor: one tensor at a time; group: layer x module group (q/k/v, o, gate/up, down); "
                                         "block: layer x block (attention, feed-forward)")
    cache_dir: str | None = None
    heatmap_png: str | None = Field(None, description="write the heatmap here")
    units: list[str] | None = Field(None, description="measure only these units (tensor names or 'blk.N.<group>'); default all")
    threads: int | None = None


class SensitivityRow(Strict):
    unit: str  # tensor name or 'blk.N.<group>' / 'token_embd'
    tensors: list[str]
    layer: int
    group: str
    n_weights: int
    type: str
    bytes: int
    kld: float = Field(description="mean KL divergence against the float model with only this unit quantized")
    kld_stderr: float | None = Field(None, description="its standard error over the scored positions (None: measured before it was kept)")
    n_tokens: int = 0
    source: Literal["measured", "store", "prior"] = Field("measured", description="measured: on this model (now or from the "
                                                          "cache); store: this model's own row from the knowledge store; prior: "
                                                          "not measured, the value related models of the family measured")
    prior_from: list[str] = Field(default_factory=list, description="source prior: the related models it comes from")


class SensitivityResult(Strict):
    model: str
    key: str = Field(description="cache key: model, text, types, granularity")
    cache_file: str
    rows: list[SensitivityRow]
    measured: int = Field(description="rows measured in this call (the rest came from the cache)")
    unmeasured: int = Field(0, description="rows never measured on this model: their value is a prior from related models")
    wall_s: float
    heatmap_png: str | None = None


class Allocation(Strict):
    method: str  # greedy | ilp
    budget_bytes: int
    genome: dict[str, str]
    bytes: int
    bits_per_weight: float
    predicted_kld: float = Field(description="sum of the units' measured sensitivities (a prediction, not a measurement)")


class SearchRequest(Strict):
    model: str
    text: list[TextSpec] = Field(description="held-out text the search scores candidates on, one entry per domain")
    sensitivity_text: list[TextSpec] = Field(description="calibration text for the sensitivity table")
    types: list[str] = Field(default_factory=lambda: ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
    granularity: str = Field("group", pattern="^(tensor|group|block)$")
    budgets_bpw: list[float] = Field(default_factory=lambda: [5.0, 5.5, 6.2], description="seed budgets (bits per weight)")
    max_bpw: float | None = Field(None, description="candidates above this are not measured (pruned before quantizing); "
                                                     "default: the largest seed budget plus bpw_margin")
    bpw_margin: float | None = Field(0.3, ge=0, description="with no max_bpw, the size cap is the largest budget plus this many "
                                                              "bits per weight; None: no cap")
    seed_maps: list[str] = Field(default_factory=list, description="precision-map files (JSON/YAML) enqueued as first trials")
    trials: int = Field(20, ge=1)
    workers: int = Field(1, ge=0, description="worker processes here; 0: create / report only (workers run elsewhere)")
    sampler: str = Field("nsga2", pattern="^(nsga2|tpe)$")
    population: int = Field(8, ge=2)
    storage: str | None = Field(None, description="optuna storage: a journal file path (default), sqlite:///, or postgresql://")
    study: str = "quantloop-search"
    resume: bool = False
    target: str = "cpu"
    imatrix: CalibrationSpec | None = Field(None, description="candidates (and the maps written) are quantized by llama-quantize "
                                            "with an importance matrix from this calibration text (llama-imatrix, computed "
                                            "once and cached); None: without one")
    speed_tokens: int = Field(32, ge=1, description="tokens generated per llama-bench tg run")
    speed_repeats: int = Field(2, ge=1)
    out_dir: str
    validate_front: int = Field(4, ge=0, description="front members re-validated on the test split (fewest KLD per byte first)")
    test_text: list[TextSpec] = Field(default_factory=list)
    tracking_uri: str | None = None
    seed: int = 0
    threads: int | None = None


class CandidateMeasurement(Strict):
    genome: dict[str, str]
    kld_mean: float = Field(description="mean over domains of the mean KLD against the F16 GGUF on llama.cpp")
    kld_by_domain: dict[str, float]
    ppl_increase_pct: float
    bytes: int = Field(description="exact file bytes (size estimate, equal to the written file)")
    bytes_written: int
    bits_per_weight: float
    tg_tokens_per_s: float = Field(description="llama-bench token generation, best of the repeats")


class FrontMember(Strict):
    trial: int
    origin: str  # seed name (greedy@5.0, ilp@4.49, ...) or sampler
    measured: CandidateMeasurement
    map_json: str | None = None
    map_yaml: str | None = None
    test_kld_mean: float | None = None
    test_ppl_increase_pct: float | None = None
    estimated: dict[str, float] = Field(default_factory=dict, description="estimated_* roofline fields of the target")


class SearchResult(Strict):
    study: str
    storage: str
    trials_complete: int
    trials_measured_here: int
    front: list[FrontMember]
    baselines: list[Allocation]
    target: str
    front_png: str | None = None
    heatmap_png: str | None = None
    result_json: str
    wall_s: float
