"""`quantloop train-slm`: the command line of quantloop/pipelines/train_slm.py."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from quantloop.paths import DEFAULT_MODEL_DIR
from quantloop.pipelines.report_format import table
from quantloop.pipelines.train_slm import (
    DEFAULT_LR,
    FINETUNE_LR,
    MANIFEST_NAME,
    MAX_EPOCHS,
    SIZES,
    train_slm,
)


def cmd_train(a) -> int:
    t0 = time.perf_counter()
    m = train_slm(a.out, size=a.size, steps=a.steps, save_every=a.save_every, batch_size=a.batch_size, seqlen=a.seqlen,
                  lr=a.lr, seed=a.seed, dataset_dir=a.dataset, tokenizer_dir=a.tokenizer, overwrite=a.overwrite,
                  eval_windows=a.eval_windows, init=a.init)
    print(f"model: {a.out}  (size {m['size']}, {m['n_params']:,} parameters, seed {m['seed']}, device {m['device']})")
    print(table(["step", "validation loss", "validation ppl", "unigram ppl", "train loss", "train time"],
                [[r["step"], f"{r['validation_loss']:.4f}", f"{r['validation_ppl']:.2f}", f"{m['unigram_validation_ppl']:.2f}",
                  f"{r['train_loss']:.4f}", f"{r['wall_s']:.1f} s"] for r in m["checkpoints"]]))
    print(f"manifest: {Path(a.out) / MANIFEST_NAME}   wall time: {time.perf_counter() - t0:.1f} s this invocation")
    return 0


def add_train_command(subparsers) -> argparse.ArgumentParser:
    sizes = "; ".join(f"{k}: hidden {v['hidden_size']}, {v['num_hidden_layers']} layers" for k, v in SIZES.items())
    s = subparsers.add_parser(
        "train-slm", help="train a small Llama from scratch, or fine-tune a prepared model (--init): float checkpoints",
        description="Train a LlamaForCausalLM from scratch on the prepared dataset's train split with the SmolLM2 tokenizer. "
                    "Every --save-every steps and at the end: validation perplexity on fixed windows of the validation split, "
                    "and DIR/step_N/ (DIR: --out), a prepared model (float32 safetensors, F16 GGUF, quantloop_model.json) that `quantloop "
                    "run DIR` and the other commands take. DIR/training_manifest.json records the run and the unigram "
                    "perplexity to beat. The same command again resumes from the last checkpoint; a larger --steps "
                    "continues training. Refused: a --steps so large it passes over the train split more than "
                    f"{MAX_EPOCHS} times. With --init DIR the run starts from that prepared model's weights instead "
                    f"(a fine-tune: the same architecture and shapes, so a second checkpoint of the model's family, "
                    f"default peak rate {FINETUNE_LR:g}); --size is then ignored.",
        epilog="Models and text are local only; nothing is fetched from a model hub.")
    s.add_argument("--size", default="tiny", metavar="|".join(SIZES), help=f"model size ({sizes}; default: tiny)")
    s.add_argument("--steps", type=int, metavar="N", required=True,
                   help="optimizer steps in total, counting those already done (required; one step of 8 x 512 tokens of the "
                        "tiny model takes about 6-12 s on 2 CPU cores)")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder for step_N checkpoints, e.g. SLM/models/checkpoints/NAME (required)")
    s.add_argument("--save-every", type=int, metavar="K", help="checkpoint every K steps, and at the end (default: --steps / 4)")
    s.add_argument("--batch-size", type=int, metavar="B", default=8, help="windows per step (default: 8)")
    s.add_argument("--seqlen", type=int, metavar="L", default=512, help="tokens per window (default: 512, the evaluation context)")
    s.add_argument("--lr", type=float, metavar="LR",
                   help="peak learning rate: linear warmup over --steps/10 steps (at most 200), cosine to lr/10 "
                        f"(default: {', '.join(f'{v:g} for {k}' for k, v in DEFAULT_LR.items())})")
    s.add_argument("--seed", type=int, metavar="S", default=0, help="seed of the initial weights and of the training windows (default: 0)")
    s.add_argument("--eval-windows", type=int, metavar="W", default=16, help="validation windows of --seqlen tokens per checkpoint (default: 16)")
    s.add_argument("--dataset", metavar="DIR", help="prepared dataset folder (default: SLM/datasets/shakespeare)")
    s.add_argument("--tokenizer", metavar="DIR", help=f"folder with the tokenizer (default: {DEFAULT_MODEL_DIR}, SmolLM2's)")
    s.add_argument("--init", metavar="DIR", help="fine-tune this prepared model (e.g. SLM/models/checkpoints/smollm2-135m-offgrid) "
                   "on --dataset instead of training from scratch; its tokenizer unless --tokenizer")
    s.add_argument("--overwrite", action="store_true", help="delete an earlier train-slm run in --out and start again")
    s.set_defaults(func=cmd_train)
    return s
