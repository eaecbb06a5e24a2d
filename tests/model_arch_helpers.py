"""Tiny random models of every architecture in quantloop.gguf.architectures (Llama, Qwen2, Qwen3, Gemma 3, Phi-3),
built from transformers configs with the SmolLM2 tokenizer, and their logits on both runtimes (shared by the
architecture tests of the quantloop quantizers and of the library quantizers)."""

import json

import numpy as np
import torch

VOCAB = 49152
SHAPES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles.")


def tiny_config(arch: str, hidden: int = 64):
    """A tiny config of `arch`: `hidden` wide, feed-forward twice that, 4 heads of hidden / 4, 2 key/value heads."""
    import transformers as tf

    shapes, head = SHAPES | dict(hidden_size=hidden, intermediate_size=2 * hidden), hidden // 4
    if arch == "llama":
        return tf.LlamaConfig(**shapes, tie_word_embeddings=True)
    if arch == "qwen2":  # q/k/v carry biases
        return tf.Qwen2Config(**shapes, tie_word_embeddings=True)
    if arch == "qwen3":  # per-head q/k norms
        return tf.Qwen3Config(**shapes, head_dim=head, tie_word_embeddings=True)
    if arch == "gemma3":  # 6 layers: five sliding-window layers then a global one, as llama.cpp's Gemma 3 expects
        return tf.Gemma3TextConfig(**(shapes | dict(num_hidden_layers=6)), head_dim=head, query_pre_attn_scalar=head,
                                   sliding_window=512)
    if arch == "phi3":  # fused qkv and gate_up, untied head
        return tf.Phi3Config(**shapes, original_max_position_embeddings=1024, pad_token_id=0, tie_word_embeddings=False)
    raise ValueError(arch)


ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3")


def build_tiny(arch: str, out, tokenizer_dir, seed: int = 0, hidden: int = 64):
    """A tiny random model of `arch` (`hidden` wide) with generic norm gains and biases, saved with the SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms start at 1 (Gemma: 0) and biases at 0; make them generic
                p.uniform_(-0.3, 0.3) if name.endswith("bias") or arch == "gemma3" else p.uniform_(0.7, 1.3)
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(out)
    if arch == "phi3":  # llama.cpp converts a Phi-3 vocabulary from tokenizer.model, or from tokenizer.json as Phi-4's GPT2Tokenizer
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps(cfg | {"tokenizer_class": "GPT2Tokenizer"}))
    if arch == "qwen2":  # transformers reads a Qwen2 vocabulary with Qwen's own pre-tokenizer, whose hash llama.cpp's
        sentencepiece_model(out / "tokenizer.model")  # converter knows only for Qwen's vocabulary: it reads tokenizer.model first
    return out


def sentencepiece_model(path):
    """A small sentencepiece vocabulary trained here on public-domain text (the converter pads it to the model's size)."""
    import io

    import sentencepiece as spm

    from quantloop.models.offgrid import CHECK_TEXT

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CHECK_TEXT.split(". ") * 4), model_writer=buf, vocab_size=200,
                                   hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buf.getvalue())


def tiny_models(root, tokenizer_dir, hidden: int = 64):
    """arch -> a prepared tiny checkpoint `hidden` wide (float32 HF folder, F16 GGUF, manifest), built on first use."""
    from quantloop.models.checkpoints import prepare_model

    done = {}

    def get(arch):
        if arch not in done:
            name = f"tiny-{ARCHS.index(arch)}"  # not the architecture: llama.cpp gives a model named *phi3* Phi-3's tokens
            build_tiny(arch, root / f"raw-{name}", tokenizer_dir, hidden=hidden)
            prepare_model(root / f"raw-{name}", name, root / "checkpoints")
            done[arch] = root / "checkpoints" / name
        return done[arch]
    return get


def hf_logits(hf_dir, ids):
    from quantloop.eval.runtimes import TransformersRunner

    return TransformersRunner(hf_dir, device="cpu", threads=1).logits(ids)


def llama_logits(gguf, ids):
    from quantloop.eval.runtimes import LlamaCppRunner

    runner = LlamaCppRunner(gguf, n_ctx=128, threads=1)
    try:
        return runner.logits(ids)
    finally:
        runner.close()


def text_ids(hf_dir):
    from quantloop.models.checkpoints import load_hf_tokenizer

    return load_hf_tokenizer(hf_dir)(TEXT, add_special_tokens=False)["input_ids"]


def check_quantized_run(arch, ckpt, result, on_grid_logits=hf_logits):
    """The exported GGUF on llama.cpp computes what the on-grid checkpoint (by default the float one beside it) computes
    on transformers, far closer than quantization moved it from the float model."""
    from pathlib import Path

    gguf = Path(result.model_path)
    ids = text_ids(ckpt)
    ref, on_grid, runtime = hf_logits(ckpt, ids), on_grid_logits(gguf.parent, ids), llama_logits(gguf, ids)
    moved = np.abs(on_grid - ref).max()
    mismatch = np.abs(runtime - on_grid).max()
    assert moved > 0.01 * np.abs(ref).max(), arch  # quantization changed the model measurably
    assert mismatch < 0.5 * moved, (arch, mismatch, moved)
    assert "exact export" in result.notes[0] and " 0 of them" not in result.notes[0]
