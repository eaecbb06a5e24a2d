"""The QAT training loop: distillation of the float teacher into a student on the exact GGUF grid.

Protocol (seed 002): the student starts from the teacher's weights, or from GPTQ's solution on the same grid
(init "gptq": act-order GPTQ of every linear, whose block scales the student starts from); calibration sequences
(real or self-generated); the token embedding / output head on their grid from the start and trained with
everything else; each decoder layer's sensitivity (KL with only that layer quantized) orders the layers,
which are quantized in groups, a few steps per stage, a stage stopping early when the held-out KL rises past a
threshold; then a global fine-tune. Loss: T^2 * KL(teacher || student) on the logits (the teacher's top-k
log-probabilities cached per sequence, see teacher.py). Level types (Q4_0, Q5_0, Q8_0, IQ4_NL) learn their
fp16 block scales (learned_scales) with their own learning rate.

Public: QATConfig, QATResult, run_qat.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantloop.backends.gptq.grid import gptq_gguf_model_
from quantloop.backends.qat.grid import (
    GridWeight,
    grid_copy,
    unwrap_student,
    wrap_student,
)
from quantloop.backends.qat.schedule import StepPlan
from quantloop.backends.qat.teacher import (
    TeacherCache,
    full_logits,
    kl_divergence,
    topk_kl,
)
from quantloop.errors import InputError
from quantloop.eval.runtimes import default_threads
from quantloop.gguf.block_types import FLOAT_TYPES
from quantloop.gguf.export import llama_embedding_type
from quantloop.gguf.learned_scales import has_levels
from quantloop.gguf.torch_grid import check_grid_model, check_grid_type, linear_types

INITS = ("teacher", "gptq")


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
    sensitivity_sequences: int = 2  # sequences the per-layer sensitivity is measured on
    teacher_top_k: int = 256  # teacher log-probabilities kept per position (0: full vocabulary, teacher run every step)
    learn_scales: bool = True  # level types (Q4_0, Q5_0, Q8_0, IQ4_NL): train the fp16 block scales
    scale_lr: float = 1e-3  # Adam learning rate of the log block scales
    train_embedding: bool = True  # a block-typed token embedding / output head trains on its grid
    init: str = "teacher"  # "teacher" or "gptq" (act-order GPTQ on the same grid first)
    seed: int = 0
    threads: int | None = None  # torch CPU threads while training (default: QUANTLOOP_THREADS, else every core)
    device: str | None = None
    progress: bool = True
    embedding_type: str | None = "auto"  # token embedding / output grid; auto: what llama-quantize picks; None: float
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF tensor-name regex -> type (first match wins), else gguf_type
    curve_every: int = 0  # record the held-out KL every this many steps (0: never)
    keep_better_start: bool = True  # training that ends above the starting held-out KL returns the starting weights
    snapshot_steps: tuple[int, ...] = ()  # steps after which run_qat's `snapshot` receives a copy of the student on its grid
    max_s: float | None = None  # time limit of run_qat (start, sensitivity, training): the steps shrink to fit (schedule.py)


@dataclass
class QATResult:
    gguf_type: str
    steps: int
    wall_s: float
    rtn_kl: float  # held-out KL at the start (every layer on its grid: round-to-nearest, or GPTQ's solution)
    final_kl: float  # held-out KL after QAT, on the weights the GGUF holds
    stages: list[dict] = field(default_factory=list)  # per stage: layers, steps, start/end KL, early_stop
    sensitivity: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    embedding_type: str | None = None
    linear_types: dict[str, int] = field(default_factory=dict)  # GGUF type -> number of linears trained for it
    init: str = "teacher"
    learned_scales: int = 0  # weights whose block scales were trained
    trained_embedding: bool = False
    timings: dict = field(default_factory=dict)  # seconds: init, sensitivity, train, eval; tokens/s of the train steps
    curve: list[dict] = field(default_factory=list)  # (step, held-out KL) along training
    planned_steps: int = 0  # the configured steps; `steps` is fewer when a stage stopped early or the time limit cut the plan
    time_limited: bool = False  # the time limit (QATConfig.max_s) cut the planned steps
    kept_start: bool = False  # training ended above the starting held-out KL, so the starting weights were kept

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_of(name: str) -> str:
    """The decoder layer a GGUF tensor belongs to ('blk.3'), or the name itself."""
    m = re.match(r"^(blk\.\d+)\.", name)
    return m.group(1) if m else name


def _batches(n: int, batch_size: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, len(perm), batch_size):
            yield perm[i:i + batch_size]


def _as_tensor(sequences) -> torch.Tensor:
    seqs = [list(map(int, s)) for s in sequences]
    if not seqs or min(len(s) for s in seqs) < 2:
        raise InputError(None, "QAT needs at least one calibration sequence of 2 or more tokens")
    n = min(len(s) for s in seqs)
    return torch.tensor([s[:n] for s in seqs], dtype=torch.long)


def _check(cfg: QATConfig) -> None:
    if cfg.steps < 0 or cfg.groups < 1 or cfg.batch_size < 1:
        raise InputError(None, f"QAT steps must be >= 0, groups and batch size >= 1 (got {cfg.steps}, {cfg.groups}, {cfg.batch_size})")
    if cfg.max_s is not None and cfg.max_s <= 0:
        raise InputError(None, f"QAT time limit must be > 0 seconds, not {cfg.max_s}", "leave it unset for no limit")
    if cfg.init not in INITS:
        raise InputError(None, f"QAT init '{cfg.init}' is not one of {', '.join(INITS)}", "use teacher or gptq")
    if cfg.teacher_top_k < 0:
        raise InputError(None, f"QAT teacher_top_k must be >= 0, not {cfg.teacher_top_k}", "use 256, or 0 for the full vocabulary")


def _gptq_start(student, train: torch.Tensor, cfg: QATConfig, gguf_type: str, emb_type: str | None) -> dict[str, torch.Tensor]:
    """Act-order GPTQ of the student's linears onto their grids, and of the output projection (a tied embedding
    included) onto the embedding's grid when that is a block type, in place, as the GPTQ step does; returns GGUF
    name -> GPTQ's block scales for the level types (the others start from GPTQ's weights and take llama.cpp's
    grid of them)."""
    blocks: dict = {}
    gptq_gguf_model_(student, train.tolist(), linear_types(student, gguf_type, cfg.tensor_types), batch_size=cfg.batch_size,
                     act_order=True, progress=cfg.progress, blocks=blocks,
                     head_type=emb_type if emb_type and emb_type not in FLOAT_TYPES else None)
    return {name: torch.from_numpy(qb.scales.astype("float32")) for name, (t, qb) in blocks.items() if has_levels(t)}


def run_qat(teacher, sequences, config: QATConfig | None = None, snapshot=None):
    """Distill `teacher` (HF causal LM, float) into a fake-quantized copy; returns (student, QATResult, blocks).

    snapshot(step, model, blocks), when given, is called after each of config.snapshot_steps (and at step 0) with
    a copy of the student as the GGUF would hold it then (plain modules, weights on the grid) and its blocks.

    The returned student has plain modules whose weights are exactly on the config's GGUF grids; `blocks` are
    their codes and scales (GGUF tensor name -> (type, QuantBlocks)), which the export writes as they are.
    """
    cfg = config or QATConfig()
    gguf_type = check_grid_type(cfg.gguf_type)
    check_grid_model(teacher, gguf_type)
    _check(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or default_threads())
    try:
        return _run(teacher, sequences, cfg, gguf_type, snapshot)
    finally:
        torch.set_num_threads(threads)


def _run(teacher, sequences, cfg: QATConfig, gguf_type: str, snapshot):
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seqs = _as_tensor(sequences)
    n_eval = min(cfg.eval_sequences, max(1, seqs.shape[0] // 4)) if seqs.shape[0] > 1 else 1
    eval_batch = seqs[-n_eval:].to(device)
    train = seqs[:-n_eval] if seqs.shape[0] > n_eval else seqs
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    timings: dict = {}

    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)
    emb_type = cfg.embedding_type
    if emb_type == "auto":
        emb_type = llama_embedding_type(gguf_type, student.get_input_embeddings().weight.shape[1])
    start_scales = _gptq_start(student, train, cfg, gguf_type, emb_type) if cfg.init == "gptq" else None
    timings["init_s"] = round(time.perf_counter() - t0, 2)
    grids = wrap_student(student, gguf_type, cfg.tensor_types, emb_type, cfg.learn_scales, start_scales)
    linears = {n: g for n, g in grids.items() if n.startswith("blk.")}
    embeddings = [g for n, g in grids.items() if not n.startswith("blk.")]
    for p in student.parameters():
        p.requires_grad_(False)
    weights = [g.weight for g in linears.values()] + ([g.weight for g in embeddings] if cfg.train_embedding else [])
    learning = list(linears.values()) + (embeddings if cfg.train_embedding else [])
    scales = [g.scales.log_scale for g in learning if g.scales is not None and cfg.learn_scales]
    for p in weights + scales:
        p.requires_grad_(True)
    start_values = [p.detach().clone() for p in weights + scales]  # kept if training ends worse than it started
    T, chunk = cfg.temperature, cfg.batch_size
    cache = TeacherCache(teacher, train, cfg.teacher_top_k, T) if cfg.teacher_top_k else None
    eval_teacher = full_logits(teacher, eval_batch, chunk)

    def eval_kl(batch, reference) -> float:
        with torch.no_grad():
            student_logits = torch.cat([student(input_ids=batch[i:i + chunk]).logits for i in range(0, batch.shape[0], chunk)])
            return float(kl_divergence(reference, student_logits, T))

    def enable(names) -> None:
        names = set(names)
        for n, g in linears.items():
            g.set_enabled(n in names)

    # sensitivity: KL with only one decoder layer on its grid (the embedding on its grid throughout)
    t1 = time.perf_counter()
    layers: dict[str, list[str]] = {}
    for n in linears:
        layers.setdefault(_layer_of(n), []).append(n)
    sensitivity = {}
    if min(cfg.groups, len(layers)) > 1:  # one group needs no order
        sens_batch = train[: max(1, min(cfg.sensitivity_sequences, train.shape[0]))].to(device)
        sens_teacher = full_logits(teacher, sens_batch, chunk)
        for layer, names in layers.items():
            enable(names)
            sensitivity[layer] = eval_kl(sens_batch, sens_teacher)
        del sens_teacher
    enable(linears)
    rtn_kl = eval_kl(eval_batch, eval_teacher)
    timings["sensitivity_s"] = round(time.perf_counter() - t1, 2)

    order = sorted(layers, key=lambda k: sensitivity.get(k, 0.0), reverse=cfg.most_sensitive_first)
    n_groups = min(cfg.groups, len(order))
    groups = [order[i * len(order) // n_groups:(i + 1) * len(order) // n_groups] for i in range(n_groups)]
    global_steps = int(round(cfg.steps * cfg.global_fraction))
    stage_steps = [(cfg.steps - global_steps) * (i + 1) // n_groups - (cfg.steps - global_steps) * i // n_groups
                   for i in range(n_groups)]

    groups_opt = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if scales:
        groups_opt.append({"params": scales, "lr": cfg.scale_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups_opt)
    plan = StepPlan(stage_steps + [global_steps], t0 + cfg.max_s if cfg.max_s else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, plan.total) / max(plan.total, 1))))
    batches = _batches(train.shape[0], cfg.batch_size, gen)
    trainable = weights + scales
    student.train()
    curve: list[dict] = [{"step": 0, "kl": rtn_kl}]
    train_s, tokens = 0.0, 0

    def step() -> float:
        nonlocal train_s, tokens
        t = time.perf_counter()
        rows = next(batches)
        b = train[rows].to(device)
        s_logits = student(input_ids=b).logits
        if cache is not None:
            top_logp, top_idx = cache.get(rows)
            loss = topk_kl(top_logp.to(device), top_idx.to(device), s_logits, T)
        else:
            with torch.no_grad():
                t_logits = teacher(input_ids=b).logits
            loss = kl_divergence(t_logits, s_logits, T)
        kl = float(loss.detach())
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * F.cross_entropy(s_logits[:, :-1].reshape(-1, s_logits.shape[-1]).float(), b[:, 1:].reshape(-1))
        del s_logits
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t
        tokens += b.numel()
        return kl

    def record(done: int) -> None:
        if cfg.curve_every and done % cfg.curve_every == 0 and curve[-1]["step"] != done:
            curve.append({"step": done, "kl": eval_kl(eval_batch, eval_teacher)})
        if snapshot is not None and done in cfg.snapshot_steps:
            t = time.perf_counter()
            frozen, frozen_blocks = grid_copy(student)
            snapshot(done, frozen, frozen_blocks)
            del frozen
            timings["snapshot_s"] = round(timings.get("snapshot_s", 0) + time.perf_counter() - t, 2)

    if 0 in cfg.snapshot_steps:
        enable(linears)
        record(0)
    stages = []
    enabled: list[str] = []
    bar = tqdm(total=plan.total, desc=f"QAT {gguf_type}", unit="step", disable=not cfg.progress)

    def advance(stage: int, label) -> float:
        kl = step()
        plan.step_done(stage)
        bar.total = plan.total
        bar.update(1)
        bar.set_postfix(stage=label, kl=f"{kl:.4g}")
        record(plan.steps_taken)
        return kl

    plan.begin()
    try:
        for gi, group in enumerate(groups):
            enabled += [n for layer in group for n in layers[layer]]
            if not plan.left(gi):  # no steps for this stage (global_fraction 1, or the time limit): its layers join the global fine-tune
                continue
            enable(enabled)
            start = eval_kl(eval_batch, eval_teacher)
            early = False
            while plan.left(gi) > 0:
                advance(gi, gi + 1)
                taken = plan.taken[gi]
                # check on the held-out batch (batch KLs are too noisy to compare)
                if cfg.check_every and taken % cfg.check_every == 0 and plan.left(gi) > 0:
                    now = eval_kl(eval_batch, eval_teacher)
                    if start > 0 and now > cfg.early_stop_ratio * start:
                        early = True
                        plan.stop_stage(gi)
            end = eval_kl(eval_batch, eval_teacher)
            stages.append({"stage": gi + 1, "layers": group, "steps": plan.taken[gi], "start_kl": start, "end_kl": end,
                           "early_stop": early})
        enable(linears)
        start = eval_kl(eval_batch, eval_teacher)
        while plan.left(len(groups)) > 0:
            advance(len(groups), "global")
        student.eval()
        trained = eval_kl(eval_batch, eval_teacher)
        kept_start = cfg.keep_better_start and trained > rtn_kl  # a few steps (a tight time limit) can leave it worse
        if kept_start:
            with torch.no_grad():
                for p, v in zip(weights + scales, start_values):
                    p.copy_(v)
        stages.append({"stage": "global", "layers": list(layers), "steps": plan.taken[-1], "start_kl": start, "end_kl": trained,
                       "early_stop": False})
    finally:
        bar.close()
    del start_values
    done = plan.steps_taken
    blocks = unwrap_student(student)
    for p in student.parameters():
        p.requires_grad_(False)
    final = eval_kl(eval_batch, eval_teacher)  # the weights the GGUF holds
    curve.append({"step": done, "kl": final, "exported": True})
    timings.update(train_s=round(train_s, 2), train_tokens=tokens, tokens_per_s=round(tokens / train_s, 1) if train_s else None,
                   s_per_step=round(train_s / done, 3) if done else None, teacher_sequences=cache.teacher_passes if cache else done * cfg.batch_size,
                   teacher_cache_s=round(cache.teacher_s, 2) if cache else None,
                   s_per_step_cache_warm=round((train_s - cache.teacher_s) / done, 3) if cache and done else None)
    result = QATResult(gguf_type=gguf_type, steps=done, wall_s=time.perf_counter() - t0, rtn_kl=rtn_kl, final_kl=final, stages=stages,
                       sensitivity=sensitivity, device=str(device), embedding_type=emb_type,
                       linear_types=dict(Counter(g.gguf_type for g in linears.values())), init=cfg.init,
                       learned_scales=len(scales), trained_embedding=bool(embeddings) and cfg.train_embedding, timings=timings,
                       curve=curve, planned_steps=cfg.steps, time_limited=plan.shrunk, kept_start=kept_start)
    return student.eval(), result, blocks


def trainable_grids(model) -> dict[str, GridWeight]:
    """GridWeights inside a wrapped model by module name (for inspection)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GridWeight)}
