"""Quantization-aware training by distillation onto an exact GGUF grid (block-32 types and k-quants).

The student is a copy of the float teacher whose q/k/v/o/gate/up/down linear weights pass through a fake
quantizer equal bit for bit to llama.cpp's own rounding (quantloop.gguf.torch_grid), trained with a
straight-through estimator; at export llama.cpp's rounding of the trained weights is written, block for
block, so the GGUF holds exactly what was trained. K-quants: each layer's sub-block grid is frozen from
llama.cpp's rounding when the layer is switched on; at the end every weight is re-rounded by llama.cpp's
k-quant rounding (what the GGUF holds) and the final KL is measured after that. Rows a super-block does
not divide use llama.cpp's fallback type, as llama-quantize does.

Protocol (seed 002): the student starts from the teacher's weights; calibration sequences (real or
self-generated); each decoder layer's sensitivity (KL with only that layer quantized) orders the layers,
which are quantized in groups, a few steps per stage, a stage stopping early when the KL rises past a
threshold; then a short global fine-tune. Loss: T^2 * KL(teacher || student) on the logits.

Public: kl_divergence, QATConfig, QATResult, run_qat, qat_checkpoint, QATBackend.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from quantloop.backends.base import Backend, BackendJob, BackendOutput, Needs, save_and_export
from quantloop.errors import InputError
from quantloop.gguf.tensor_names import linear_modules
from quantloop.gguf.torch_grid import (
    KQUANTS,
    check_grid_model,
    check_grid_type,
    fake_quantize_torch,
    kquant_grid,
    layer_type,
    linear_types,
    ste_fake_quantize,
)

# --------------------------------------------------------------------------- training wrappers


class FakeQuantLinear(torch.nn.Module):
    """Wraps an nn.Linear; when `enabled`, its weight is fake-quantized (STE) in the forward pass."""

    def __init__(self, linear: torch.nn.Linear, gguf_type: str, enabled: bool = False):
        super().__init__()
        self.linear = linear
        self.gguf_type = layer_type(gguf_type, linear.weight.shape[1])
        self.grid = None  # k-quants: (step, offset) frozen while the layer trains
        self.enabled = enabled

    def set_enabled(self, on: bool) -> None:
        if on and not self.enabled and self.gguf_type in KQUANTS:
            self.grid = kquant_grid(self.linear.weight, self.gguf_type)  # llama.cpp's rounding of the weights now
        self.enabled = on

    def forward(self, x):
        w = ste_fake_quantize(self.linear.weight, self.gguf_type, self.grid) if self.enabled else self.linear.weight
        return F.linear(x, w, self.linear.bias)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the GGUF stores it (k-quants: llama.cpp's own rounding of the trained weight)."""
        with torch.no_grad():
            if self.gguf_type in KQUANTS:
                from quantloop.gguf import blocks as gb

                w = self.linear.weight
                return torch.from_numpy(gb.fake_quantize(w.detach().float().cpu().numpy(), self.gguf_type)).to(w.device, w.dtype)
            return fake_quantize_torch(self.linear.weight, self.gguf_type)


def _wrap(model, gguf_type: str, tensor_types: dict[str, str] | None = None) -> dict[str, FakeQuantLinear]:
    wrapped = {}
    types = linear_types(model, gguf_type, tensor_types)
    for name, lin in linear_modules(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        fq = FakeQuantLinear(lin, types[name])
        setattr(parent, attr, fq)
        wrapped[name] = fq
    return wrapped


def _unwrap(model, wrapped: dict[str, FakeQuantLinear]) -> dict:
    """Put plain nn.Linears back, with their weights replaced by the fake-quantized values (exactly on the grid).
    Returns the blocks the GGUF will hold: llama.cpp's rounding of each trained weight (GGUF name -> (type, blocks)),
    which the export checks against these weights and writes as they are."""
    from quantloop.gguf import blocks as gb
    from quantloop.gguf.tensor_names import gguf_tensor_name

    blocks = {}
    with torch.no_grad():
        for name, fq in wrapped.items():
            latent = fq.linear.weight.detach().float().cpu().numpy()
            blocks[gguf_tensor_name(name)] = (fq.gguf_type, gb.quantize_blocks(latent, fq.gguf_type))
            fq.linear.weight.copy_(fq.quantized_weight())
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, fq.linear)
    return blocks


# --------------------------------------------------------------------------- loss


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(t/T) || softmax(s/T)), in nats."""
    T = float(temperature)
    lt = F.log_softmax(teacher_logits.float() / T, dim=-1)
    ls = F.log_softmax(student_logits.float() / T, dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(dim=-1)
    return kl.mean() * (T * T)


# --------------------------------------------------------------------------- training


@dataclass
class QATConfig:
    gguf_type: str = "Q4_0"
    steps: int = 200  # total optimizer steps: progressive stages + global fine-tune
    global_fraction: float = 0.4  # share of `steps` for the final global fine-tune
    lr: float = 1e-4  # measured on SmolLM2-135M, Q4_0, 30 steps: held-out KL 0.408 -> 0.187 (2e-5: -> 0.231)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 4
    temperature: float = 1.0
    ce_weight: float = 0.0  # loss = KL + ce_weight * CE(next token)
    groups: int = 4  # progressive stages (groups of decoder layers, ordered by sensitivity)
    most_sensitive_first: bool = True  # sensitive layers get the most training steps
    early_stop_ratio: float = 1.25  # stop a stage when the held-out KL exceeds this times the stage's starting KL
    check_every: int = 5  # steps between held-out KL checks within a stage (0: never stop early)
    eval_sequences: int = 4  # held-out sequences for the reported KL (taken from the end of the data)
    seed: int = 0
    device: str | None = None
    progress: bool = True
    embedding_type: str | None = "auto"  # token embedding / output grid; auto: what llama-quantize picks; None: float
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF tensor-name regex -> type (first match wins), else gguf_type


def _project_embeddings_(model, type_name: str) -> None:
    """Put the token embedding (and an untied output matrix) on the GGUF grid the file will hold."""
    from quantloop.gguf import blocks as gb

    with torch.no_grad():
        for m in {id(x): x for x in (model.get_input_embeddings(), model.get_output_embeddings()) if x is not None}.values():
            w = m.weight
            w.copy_(torch.from_numpy(gb.fake_quantize(w.detach().float().cpu().numpy(), type_name)).to(w.device, w.dtype))


@dataclass
class QATResult:
    gguf_type: str
    steps: int
    wall_s: float
    rtn_kl: float  # held-out KL with every layer round-to-nearest (the starting point)
    final_kl: float  # held-out KL after QAT
    stages: list[dict] = field(default_factory=list)  # per stage: layers, steps, start/end KL, early_stop
    sensitivity: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    embedding_type: str | None = None
    linear_types: dict[str, int] = field(default_factory=dict)  # GGUF type -> number of linears trained for it

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_of(name: str) -> str:
    """The decoder layer a linear belongs to ('model.layers.3'), or the name itself."""
    m = re.match(r"^(.*\.layers\.\d+)\.", name)
    return m.group(1) if m else name


def _batches(seqs: torch.Tensor, batch_size: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(seqs.shape[0], generator=gen)
        for i in range(0, len(perm), batch_size):
            yield seqs[perm[i:i + batch_size]]


def _as_tensor(sequences) -> torch.Tensor:
    seqs = [list(map(int, s)) for s in sequences]
    if not seqs or min(len(s) for s in seqs) < 2:
        raise InputError(None, "QAT needs at least one calibration sequence of 2 or more tokens")
    n = min(len(s) for s in seqs)
    return torch.tensor([s[:n] for s in seqs], dtype=torch.long)


def _set_enabled(wrapped: dict[str, FakeQuantLinear], names) -> None:
    names = set(names)
    for n, fq in wrapped.items():
        fq.set_enabled(n in names)


@torch.no_grad()
def _eval_kl(teacher, student, batch: torch.Tensor, T: float, chunk: int) -> float:
    tot, n = 0.0, 0
    for i in range(0, batch.shape[0], chunk):
        b = batch[i:i + chunk]
        tot += float(kl_divergence(teacher(input_ids=b).logits, student(input_ids=b).logits, T)) * b.shape[0]
        n += b.shape[0]
    return tot / n


def run_qat(teacher, sequences, config: QATConfig | None = None):
    """Distill `teacher` (HF causal LM, float) into a fake-quantized copy; returns (student, QATResult, blocks).

    The returned student has plain nn.Linears whose weights are exactly on the config's GGUF grid; `blocks` are
    their codes and scales (GGUF tensor name -> (type, QuantBlocks)), which the export writes as they are.
    """
    from tqdm.auto import tqdm

    cfg = config or QATConfig()
    gguf_type = check_grid_type(cfg.gguf_type)
    check_grid_model(teacher, gguf_type)
    if cfg.steps < 0 or cfg.groups < 1 or cfg.batch_size < 1:
        raise InputError(None, f"QAT steps must be >= 0, groups and batch size >= 1 (got {cfg.steps}, {cfg.groups}, {cfg.batch_size})")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seqs = _as_tensor(sequences)
    n_eval = min(cfg.eval_sequences, max(1, seqs.shape[0] // 4)) if seqs.shape[0] > 1 else 1
    eval_batch = seqs[-n_eval:].to(device)
    train = seqs[:-n_eval] if seqs.shape[0] > n_eval else seqs
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()

    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)
    emb_type = cfg.embedding_type
    if emb_type == "auto":
        from quantloop.gguf.export import llama_embedding_type

        emb_type = llama_embedding_type(gguf_type, student.get_input_embeddings().weight.shape[1])
    if emb_type is not None:
        _project_embeddings_(student, emb_type)
    wrapped = _wrap(student, gguf_type, cfg.tensor_types)
    for p in student.parameters():
        p.requires_grad_(False)
    for fq in wrapped.values():
        fq.linear.weight.requires_grad_(True)
    T = cfg.temperature
    chunk = cfg.batch_size

    # sensitivity: held-out KL with only one decoder layer fake-quantized
    layers: dict[str, list[str]] = {}
    for n in wrapped:
        layers.setdefault(_layer_of(n), []).append(n)
    sens_batch = train[: cfg.batch_size].to(device)
    sensitivity = {}
    for layer, names in layers.items():
        _set_enabled(wrapped, names)
        sensitivity[layer] = _eval_kl(teacher, student, sens_batch, T, chunk)
    _set_enabled(wrapped, wrapped)
    rtn_kl = _eval_kl(teacher, student, eval_batch, T, chunk)

    order = sorted(layers, key=lambda k: sensitivity[k], reverse=cfg.most_sensitive_first)
    n_groups = min(cfg.groups, len(order))
    groups = [order[i * len(order) // n_groups:(i + 1) * len(order) // n_groups] for i in range(n_groups)]
    global_steps = int(round(cfg.steps * cfg.global_fraction)) if cfg.groups > 0 else cfg.steps
    stage_steps = [(cfg.steps - global_steps) * (i + 1) // n_groups - (cfg.steps - global_steps) * i // n_groups
                   for i in range(n_groups)]

    params = [fq.linear.weight for fq in wrapped.values()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = sum(stage_steps) + global_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1))))
    batches = _batches(train, cfg.batch_size, gen)
    student.train()

    def step() -> float:
        b = next(batches).to(device)
        with torch.no_grad():
            t_logits = teacher(input_ids=b).logits
        s_logits = student(input_ids=b).logits
        loss = kl_divergence(t_logits, s_logits, T)
        kl = float(loss.detach())
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * F.cross_entropy(s_logits[:, :-1].reshape(-1, s_logits.shape[-1]).float(),
                                                          b[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        return kl

    stages = []
    done = 0
    enabled: list[str] = []
    bar = tqdm(total=total, desc=f"QAT {gguf_type}", unit="step", disable=not cfg.progress)
    try:
        for gi, (group, n_steps) in enumerate(zip(groups, stage_steps)):
            enabled += [n for layer in group for n in layers[layer]]
            _set_enabled(wrapped, enabled)
            start = _eval_kl(teacher, student, eval_batch, T, chunk)
            early, taken = False, 0
            for _ in range(n_steps):
                kl = step()
                taken += 1
                bar.update(1)
                bar.set_postfix(stage=gi + 1, kl=f"{kl:.4g}")
                # check on the held-out batch (batch KLs are too noisy to compare)
                if cfg.check_every and taken % cfg.check_every == 0 and taken < n_steps:
                    now = _eval_kl(teacher, student, eval_batch, T, chunk)
                    if start > 0 and now > cfg.early_stop_ratio * start:
                        early = True
                        break
            end = _eval_kl(teacher, student, eval_batch, T, chunk)
            done += taken
            stages.append({"stage": gi + 1, "layers": group, "steps": taken, "start_kl": start, "end_kl": end,
                           "early_stop": early})
        _set_enabled(wrapped, wrapped)
        start = _eval_kl(teacher, student, eval_batch, T, chunk)
        for _ in range(global_steps):
            kl = step()
            done += 1
            bar.update(1)
            bar.set_postfix(stage="global", kl=f"{kl:.4g}")
        student.eval()
        trained = _eval_kl(teacher, student, eval_batch, T, chunk)
        stages.append({"stage": "global", "layers": list(layers), "steps": global_steps, "start_kl": start,
                       "end_kl": trained, "early_stop": False})
    finally:
        bar.close()
    blocks = _unwrap(student, wrapped)
    for p in student.parameters():
        p.requires_grad_(False)
    final = _eval_kl(teacher, student, eval_batch, T, chunk)  # the weights the GGUF holds
    result = QATResult(gguf_type=gguf_type, steps=done, wall_s=time.perf_counter() - t0, rtn_kl=rtn_kl,
                       final_kl=final, stages=stages, sensitivity=sensitivity, device=str(device), embedding_type=emb_type,
                       linear_types=dict(Counter(fq.gguf_type for fq in wrapped.values())))
    return student.eval(), result, blocks


def qat_checkpoint(hf_dir, out_dir, gguf_type: str, sequences, steps: int = 200, seed: int = 0,
                   config: QATConfig | None = None, overwrite: bool = False, gguf_name: str | None = None,
                   tensor_types: dict[str, str] | None = None, embedding_type: str = "auto") -> Path:
    """QAT of the float checkpoint hf_dir for `gguf_type`; writes out_dir (float32 HF checkpoint, weights on
    the grid, plus tokenizer and qat_result.json) and out_dir/<name>-<type>.gguf; returns the GGUF path."""

    from quantloop.models.checkpoints import load_hf_model

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    gguf_type = check_grid_type(gguf_type)
    cfg = dataclasses.replace(config or QATConfig(), gguf_type=gguf_type, steps=int(steps), seed=int(seed),
                              tensor_types=dict(tensor_types or {}), embedding_type=embedding_type)
    teacher = load_hf_model(hf_dir)
    check_grid_model(teacher, gguf_type, hf_dir)
    student, result, blocks = run_qat(teacher, sequences, cfg)
    del teacher
    gguf_name = gguf_name or f"{hf_dir.resolve().name}-{gguf_type}.gguf"
    return save_and_export(student, hf_dir, out_dir, "qat_result.json", result.to_dict(), gguf_name, gguf_type,
                           embedding_type=result.embedding_type or "F16", tensor_types=cfg.tensor_types, overwrite=overwrite,
                           blocks=blocks)


class QATBackend(Backend):
    """Quantization-aware training by KL distillation onto a GGUF type's grid (or a precision map's grids)."""

    method = "qat"
    writer = "the QAT export"
    libraries = ("torch", "transformers", "gguf")

    def needs(self, spec) -> Needs:
        return Needs(hf_checkpoint=True, f16_gguf=spec.has_precision_map(), calibration="sequences")

    def plan(self, job: BackendJob) -> tuple[str, dict[str, str], dict[str, str], str]:
        """(GGUF type, tensor-type rules, planned types, embedding type); the type is checked for QAT."""
        from quantloop.gguf.precision_map import plan_precision_map

        spec = job.spec
        if not spec.has_precision_map():
            return check_grid_type(spec.gguf_type, spec.bits, spec.symmetric), {}, {}, "auto"
        base, rules, planned, embedding_type = plan_precision_map(job.model.gguf, spec)  # base: the embeddings' type
        return check_grid_type(base), rules, planned, embedding_type

    def check(self, job: BackendJob) -> None:
        self.plan(job)

    def quantize(self, job: BackendJob) -> BackendOutput:
        spec = job.spec
        gguf_type, rules, planned, embedding_type = self.plan(job)
        path = qat_checkpoint(job.model.hf_dir, job.work_dir, gguf_type, job.sequences, steps=spec.qat_steps, seed=spec.seed,
                              gguf_name=job.gguf_name(), tensor_types=rules, embedding_type=embedding_type)
        import json

        from quantloop.gguf.export import export_note

        exported = json.loads((job.work_dir / "qat_result.json").read_text())["export"]
        return BackendOutput(path, f"gguf:mixed-{spec.preset or 'custom'}" if spec.has_precision_map() else f"gguf:{gguf_type}",
                             planned, notes=[export_note(exported)])
