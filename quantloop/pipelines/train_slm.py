"""`quantloop train-slm`: train a small Llama from scratch, as a float reference that sits on no quantization grid,
or (`--init DIR`) fine-tune a prepared model on another text: a second checkpoint of the same family.

    <out>/
        step_<N>/                      one prepared model per checkpoint (any quantloop command takes it):
            config.json, model.safetensors, tokenizer files     float32, transformers loads it
            <name>-step_<N>-f16.gguf                            the same weights for llama.cpp
            quantloop_model.json                                manifest
        train_state.pt                 model + optimizer + data-RNG state of the last checkpoint (resume)
        training_manifest.json         size, config, seed, per-checkpoint validation loss/ppl, unigram baseline

Running the same command again with the same --out resumes from the last checkpoint; a larger --steps
continues training (the cosine schedule is stretched to the new --steps). The training text is the prepared
dataset's train split; validation perplexity is measured on a fixed set of windows of its validation split
(all positions of each window scored), next to the add-one-smoothed unigram perplexity of the train split's
token frequencies on the same tokens: the baseline a trained model has to beat.

The command line is in quantloop/pipelines/train_command.py.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from tqdm import tqdm

from quantloop.data.datasets import load_manifest, read_split
from quantloop.errors import InputError
from quantloop.fileio import atomic_output, write_json_atomic
from quantloop.gguf.llamacpp import convert_hf_to_gguf
from quantloop.models.checkpoints import MANIFEST, load_hf_model, load_hf_tokenizer, resolve_model
from quantloop.paths import DATASETS_DIR, DEFAULT_MODEL_DIR
from quantloop.schemas import ModelManifest

# LlamaConfig kwargs per size; vocab_size comes from the tokenizer (49152 for SmolLM2), so with tied
# embeddings the embedding dominates the parameter count. Widths are multiples of 32 (GGUF Q4_0/Q8_0
# blocks); intermediate sizes and the small model's hidden size are multiples of 256 (k-quant super-blocks).
SIZES: dict[str, dict] = {
    # about 1.6 M parameters: a trained model that takes seconds (test fixtures; too small to beat much)
    "micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128),
    # about 7.3 M parameters (6.3 M of them the tied embedding)
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024),
    # about 17.3 M parameters (12.6 M of them the tied embedding)
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024),
}
# Peak learning rates: a short run on a few CPU cores is step-bound, so the tiny model learns fastest at a high rate
# (8 steps of 8 x 64 tokens: validation loss 7.26 at 1e-2 against 8.39 at 3e-3).
DEFAULT_LR = {"micro": 1e-2, "tiny": 1e-2, "small": 5e-3}
FINETUNE_LR = 1e-4  # --init: a short fine-tune of a trained model moves it to the new text without breaking it
FINETUNE_SIZE = "fine-tune"
COMMON_CONFIG = dict(tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
                     rope_theta=10000.0, attention_dropout=0.0, hidden_act="silu")

MANIFEST_NAME = "training_manifest.json"
STATE_NAME = "train_state.pt"
TOOL = "quantloop train-slm"
STEP_DIR = re.compile(r"^step_(\d+)$")
MAX_EPOCHS = 50  # --steps * --batch-size * --seqlen may not exceed this many passes over the train split
DEFAULT_DATASET_DIR = DATASETS_DIR / "shakespeare"
REFERENCE_NOTE = ("float32 model trained from scratch by `quantloop train-slm` (size {size}, seed {seed}, step {step}); "
                  "its weights were never rounded to any quantization grid")
FINETUNE_NOTE = ("float32 fine-tune of {init} by `quantloop train-slm --init` (seed {seed}, step {step}) on {dataset}; "
                 "the same architecture and shapes as {init}, other weights")


def model_config(size: str, vocab_size: int) -> dict:
    if size not in SIZES:
        raise InputError(None, f"--size '{size}': no such size", f"choose one of {', '.join(SIZES)}")
    return {**SIZES[size], **COMMON_CONFIG, "vocab_size": vocab_size}


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then cosine down to lr/10 at `total`."""
    if step <= warmup:
        return lr * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def warmup_steps(total: int) -> int:
    return max(1, min(200, total // 10))


@lru_cache(maxsize=8)
def _token_ids(dataset_dir: str, split: str, tokenizer_dir: str, sha: str):
    import torch  # deferred: torch


    tok = load_hf_tokenizer(Path(tokenizer_dir))
    tok.model_max_length = 1 << 40  # one long text on purpose: no "longer than the maximum" warning
    ids = tok(read_split(Path(dataset_dir), split), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_ids(dataset_dir: Path, split: str, tokenizer_dir: Path):
    """Token ids of one split (cached per process: the train split takes seconds to tokenize)."""
    info = load_manifest(dataset_dir).splits.get(split)
    if info is None:
        raise InputError(dataset_dir, f"no '{split}' split in the manifest", "run `quantloop prepare`")
    return _token_ids(str(dataset_dir), split, str(tokenizer_dir), info.sha256)


def validation_windows(val_ids, seqlen: int, n: int):
    """n windows of seqlen+1 tokens spread evenly over the validation split (fixed: no randomness)."""
    import torch  # deferred: torch

    span = seqlen + 1
    if len(val_ids) < span:
        return None
    last = len(val_ids) - span
    n = min(n, len(val_ids) // span)
    starts = [round(i * last / max(1, n - 1)) for i in range(n)] if n > 1 else [0]
    return torch.stack([val_ids[s:s + span] for s in starts])


def unigram_ppl(train_ids, targets, vocab_size: int) -> float:
    """Perplexity of the targets under the train split's add-one-smoothed token frequencies."""
    import torch  # deferred: torch

    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(torch.exp(-logp[targets.reshape(-1)].mean()))


def evaluate(model, windows, batch_size: int, device) -> float:
    """Mean next-token loss over every position of the validation windows."""
    import torch  # deferred: torch
    import torch.nn.functional as F  # deferred: torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            w = windows[i:i + batch_size].to(device)
            logits = model(w[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += w[:, 1:].numel()
    model.train()
    return total / count


def _torch_save_atomic(obj, path: Path) -> None:
    import torch  # deferred: torch


    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def step_dirs(out: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in out.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))} if out.is_dir() else {}


def check_out_dir(out: Path, settings: dict, overwrite: bool) -> dict | None:
    """Refuse an --out that holds something else; return the earlier manifest to resume from (None: fresh start)."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out is a file", "pass a folder for the checkpoints")
    if not out.is_dir():
        return None
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return None
    mpath = out / MANIFEST_NAME
    if not mpath.is_file():
        what = ("holds another model" if any((out / f).exists() for f in ("config.json", "quantloop_model.json"))
                or any(out.glob("*.gguf")) else "is not empty and holds no train-slm output")
        raise InputError(out, f"--out {what} (no {MANIFEST_NAME})", "pass a new or empty folder for --out")
    try:
        old = json.loads(mpath.read_text())
        if old.get("tool") != TOOL:
            raise ValueError(f"not written by {TOOL}")
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(mpath, f"not a train-slm manifest ({str(e).splitlines()[0][:80]})", "pass a new or empty folder for --out") from None
    stray = [p.name for p in entries if p.name not in (MANIFEST_NAME, STATE_NAME) and not STEP_DIR.match(p.name)]
    if stray:
        raise InputError(out, f"--out holds files train-slm did not write ({', '.join(sorted(stray)[:3])})", "pass a new or empty folder for --out")
    if overwrite:
        for p in entries:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return None
    for key, value in settings.items():
        if old.get(key) != value:
            flag = {"config": "--size", "size": "--size"}.get(key, "--" + key.replace("_", "-"))
            raise InputError(out, f"was trained with another {key} ({old.get(key)!r}, now {value!r})",
                             f"pass the same {flag} to resume, --overwrite to start again, or another --out")
    return old


def save_checkpoint(model, tok, out: Path, step: int, n_params: int, source: str, note: str) -> Path:
    """step_<N>/: float32 safetensors + tokenizer + F16 GGUF + quantloop_model.json, written atomically."""
    step_dir = out / f"step_{step}"
    name = f"{out.resolve().name}-step_{step}"
    with atomic_output(step_dir, is_dir=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        gguf_name = f"{name}-f16.gguf"
        convert_hf_to_gguf(tmp, tmp / gguf_name, "f16")
        write_json_atomic(tmp / MANIFEST, ModelManifest(
            name=name, source=source, hf_dir=".", gguf_f16=gguf_name, architecture=model.config.architectures[0],
            n_params=n_params, reference_note=note.format(step=step),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds")))
    return step_dir


def init_hf_dir(init: Path) -> Path:
    """The transformers folder of the prepared model that --init names."""
    hf_dir = resolve_model(init).hf_dir
    if hf_dir is None:
        raise InputError(init, "--init has no transformers checkpoint (config.json) to start from",
                         "pass a prepared model folder, e.g. SLM/models/checkpoints/smollm2-135m-offgrid")
    return Path(hf_dir)


def train_slm(out: str | Path, size: str = "tiny", steps: int = 100, save_every: int | None = None, batch_size: int = 8,
              seqlen: int = 512, lr: float | None = None, seed: int = 0, dataset_dir: str | Path | None = None,
              tokenizer_dir: str | Path | None = None, overwrite: bool = False, eval_windows: int = 16,
              progress: bool = True, init: str | Path | None = None) -> dict:
    """Train (or resume) a from-scratch Llama, or fine-tune the prepared model `init`, into `out`; returns the
    training manifest (a dict)."""

    out = Path(out)
    dataset_dir = Path(dataset_dir) if dataset_dir else DEFAULT_DATASET_DIR
    init_dir = init_hf_dir(Path(init)) if init else None
    size = FINETUNE_SIZE if init_dir else size
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else (init_dir or DEFAULT_MODEL_DIR)
    for value, flag in ((steps, "--steps"), (batch_size, "--batch-size"), (eval_windows, "--eval-windows")):
        if value < 1:
            raise InputError(None, f"{flag} {value}: must be at least 1", f"pass {flag} 1 or more")
    if save_every is not None and save_every < 1:
        raise InputError(None, f"--save-every {save_every}: must be at least 1", "pass --save-every 1 or more")
    if seqlen < 8:
        raise InputError(None, f"--seqlen {seqlen}: too short", "pass --seqlen 8 or more (default 512)")
    if size not in SIZES and not init_dir:
        raise InputError(None, f"--size '{size}': no such size", f"choose one of {', '.join(SIZES)}")
    lr = (FINETUNE_LR if init_dir else DEFAULT_LR.get(size, 3e-3)) if lr is None else lr
    if not (lr > 0 and math.isfinite(lr)):
        raise InputError(None, f"--lr {lr}: must be a positive number", "pass e.g. --lr 2e-3")
    if not (dataset_dir / "manifest.json").is_file():
        raise InputError(dataset_dir, "not a prepared dataset (no manifest.json)", "run `quantloop prepare` or pass --dataset")
    if not tokenizer_dir.is_dir():
        raise InputError(tokenizer_dir, "tokenizer folder not found", "run `quantloop prepare` or pass --tokenizer")


    tok = load_hf_tokenizer(tokenizer_dir)
    config_kwargs = json.loads((init_dir / "config.json").read_text()) if init_dir else model_config(size, len(tok))
    if seqlen > config_kwargs["max_position_embeddings"]:
        raise InputError(None, f"--seqlen {seqlen}: longer than the model's {config_kwargs['max_position_embeddings']} positions",
                         f"pass --seqlen {config_kwargs['max_position_embeddings']} or less")
    settings = {"size": size, "config": config_kwargs, "seed": seed, "batch_size": batch_size, "seqlen": seqlen, "lr": lr,
                "dataset": str(dataset_dir.resolve()), "tokenizer": str(tokenizer_dir.resolve()),
                **({"init": str(init_dir.resolve())} if init_dir else {})}

    # Check the text before touching --out.
    train_ids = token_ids(dataset_dir, "train", tokenizer_dir)
    val_ids = token_ids(dataset_dir, "validation", tokenizer_dir)
    if len(train_ids) < batch_size * (seqlen + 1):
        raise InputError(dataset_dir / "train.txt", f"train split has {len(train_ids):,} tokens, fewer than one batch "
                         f"({batch_size} x {seqlen + 1})", "prepare more text, or lower --batch-size/--seqlen")
    if steps * batch_size * seqlen > MAX_EPOCHS * len(train_ids):
        raise InputError(dataset_dir / "train.txt", f"--steps {steps} x --batch-size {batch_size} x --seqlen {seqlen} would pass over "
                         f"the {len(train_ids):,}-token train split more than {MAX_EPOCHS} times",
                         "lower --steps, or prepare more text")
    windows = validation_windows(val_ids, seqlen, eval_windows)
    if windows is None:
        raise InputError(dataset_dir / "validation.txt", f"validation split has {len(val_ids)} tokens, fewer than one "
                         f"{seqlen + 1}-token window", "prepare more text, or lower --seqlen")
    old = check_out_dir(out, settings, overwrite)

    import torch  # deferred: torch
    from transformers import LlamaConfig, LlamaForCausalLM  # deferred: transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state_path = out / STATE_NAME
    torch.manual_seed(seed)
    model = (load_hf_model(init_dir) if init_dir else LlamaForCausalLM(LlamaConfig(**config_kwargs))).to(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(seed)  # the training windows: CPU, so a run resumes the same on any device
    st = None
    if old is not None:
        if not state_path.is_file():
            raise InputError(state_path, "missing: cannot resume this run", "pass --overwrite to start again, or another --out")
        try:
            st = torch.load(state_path, map_location="cpu", weights_only=False)
            model.load_state_dict(st["model"])
        except Exception as e:
            raise InputError(state_path, f"cannot resume from this state ({str(e).splitlines()[0][:100]})",
                             "pass --overwrite to start again") from None
    model.to(device)  # before the optimizer, so that its state lives on the same device
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    records: list[dict] = []
    done, train_s = 0, 0.0
    if st is not None:
        try:
            opt.load_state_dict(st["optimizer"])
            gen.set_state(st["data_rng"])
            torch.set_rng_state(st["torch_rng"])
            done, train_s, records = st["step"], st["train_s"], st["records"]
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise InputError(state_path, f"cannot resume from this state ({str(e).splitlines()[0][:100]})",
                             "pass --overwrite to start again") from None
    for s, p in step_dirs(out).items():  # a checkpoint written after the last saved state (killed run): redone
        if s > done:
            shutil.rmtree(p)

    unigram = unigram_ppl(train_ids, windows[:, 1:], config_kwargs["vocab_size"])
    save_every = save_every or max(1, steps // 4)
    warmup = warmup_steps(steps)
    if init_dir:
        source = f"fine-tuned from {init_dir.resolve()} by {TOOL} --init (seed {seed}) on {dataset_dir.resolve()} (train split)"
        note = FINETUNE_NOTE.format(init=init_dir.name, seed=seed, step="{step}", dataset=dataset_dir.name)
    else:
        source = f"trained from scratch by {TOOL} (size {size}, seed {seed}) on {dataset_dir.resolve()} (train split)"
        note = REFERENCE_NOTE.format(size=size, seed=seed, step="{step}")
    manifest = {
        "tool": TOOL, **settings, "n_params": n_params, "steps_requested": steps, "save_every": save_every,
        "schedule": {"kind": "linear warmup + cosine to lr/10", "warmup_steps": warmup, "total_steps": steps},
        "optimizer": {"kind": "AdamW", "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0},
        "device": str(device), "train_tokens": len(train_ids),
        "validation": {"windows": len(windows), "tokens_scored": int(windows[:, 1:].numel()),
                       "note": "fixed windows spread evenly over the validation split, every position scored"},
        "unigram_validation_ppl": unigram,
        "unigram_note": "add-one-smoothed token frequencies of the train split, scored on the same validation tokens",
        "optimizer_state": str(state_path.resolve()), "checkpoints": records,
    }

    def write_manifest():
        manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json_atomic(out / MANIFEST_NAME, manifest)

    stale = old is not None and old.get("checkpoints") != records  # killed between saving the state and the manifest
    if done >= steps:
        print(f"{out}: already trained to step {done} (>= --steps {steps}); nothing to do", file=sys.stderr)
        if stale:
            write_json_atomic(out / MANIFEST_NAME, {**old, "checkpoints": records})
        return {**old, "checkpoints": records}
    if stale:
        write_manifest()


    model.train()
    bar = tqdm(total=steps, initial=done, desc=f"train-slm {size}", unit="step", file=sys.stderr,
               **({} if progress else {"disable": True}))
    loss_sum, loss_n = 0.0, 0
    t0 = time.perf_counter()
    try:
        for step in range(done + 1, steps + 1):
            starts = torch.randint(0, len(train_ids) - seqlen, (batch_size,), generator=gen)
            batch = torch.stack([train_ids[s:s + seqlen + 1] for s in starts.tolist()]).to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, warmup)
            logits = model(batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_v = float(loss.detach())
            if not math.isfinite(loss_v):
                raise RuntimeError(f"training loss became {loss_v} at step {step}; lower --lr")
            loss_sum, loss_n = loss_sum + loss_v, loss_n + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            if step % save_every == 0 or step == steps:
                train_s += time.perf_counter() - t0
                val_loss = evaluate(model, windows, batch_size, device)
                save_checkpoint(model, tok, out, step, n_params, source, note)
                records.append({"step": step, "validation_loss": val_loss, "validation_ppl": math.exp(val_loss),
                                "train_loss": loss_sum / loss_n, "wall_s": round(train_s, 2), "tokens_seen": step * batch_size * seqlen})
                _torch_save_atomic({"step": step, "train_s": train_s, "records": records, "model": model.state_dict(),
                                    "optimizer": opt.state_dict(), "data_rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
                                    "settings": settings}, state_path)
                write_manifest()
                bar.write(f"step {step}: validation loss {val_loss:.4f}, ppl {math.exp(val_loss):.2f} "
                          f"(unigram {unigram:.2f}), train loss {loss_sum / loss_n:.4f} -> {out / f'step_{step}'}")
                loss_sum, loss_n = 0.0, 0
                t0 = time.perf_counter()
    finally:
        bar.close()
    return manifest
