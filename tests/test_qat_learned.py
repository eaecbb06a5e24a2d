"""QAT's learned block scales, the trained 4-bit token embedding / head, GPTQ's start and the cached teacher."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quantloop.backends.qat.teacher import TeacherCache, kl_divergence, topk_kl
from quantloop.errors import InputError
from quantloop.gguf import blocks as gb
from quantloop.gguf.learned_scales import LEVELS_TYPES, LearnedScales, type_levels


def _weight(rows=16, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, :32] = 0  # an all-zero block
    w[1, 32:64] = w[1, 32:64].abs()  # one-signed
    w[2, :] = torch.randn(cols, generator=g).pow(3) * 0.01  # heavy tails
    return w


def _stored_values(codes: np.ndarray, d: np.ndarray, type_name: str) -> np.ndarray:
    """What llama.cpp reads back from the bytes of these codes and scales (gguf-py's dequantizer)."""
    import gguf

    raw = gb.pack(codes, d, None, type_name)
    return gguf.quants.dequantize(raw, gb.qtype(type_name)).reshape(codes.shape)


@pytest.mark.parametrize("type_name", LEVELS_TYPES)
def test_learned_scales_are_what_the_block_stores(type_name):
    """After the scales have moved, the fake-quantized weight equals what llama.cpp reads from the written block, bit for bit."""
    w = _weight().requires_grad_(True)
    ls = LearnedScales.from_weight(w, type_name)
    start = ls.blocks(w)[1].copy()
    opt = torch.optim.Adam([{"params": [w], "lr": 1e-3}, {"params": [ls.log_scale], "lr": 3e-2}])
    x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(1))
    target = x @ (w.detach() * 1.1).T
    for _ in range(8):
        opt.zero_grad()
        ((x @ ls(w).T - target) ** 2).mean().backward()
        opt.step()
    codes, d = ls.blocks(w)
    assert d.dtype == np.float16 and (d != start).mean() > 0.5  # the stored scales are the learned ones
    values = ls.quantized(w).numpy()
    np.testing.assert_array_equal(_stored_values(codes, d, type_name), values)
    lv, offset = type_levels(type_name)
    assert codes.min() >= offset and codes.max() <= offset + len(lv) - 1


def test_lsq_gradients():
    """Weights pass straight through inside the block's range and not outside; d gets L[code] - w/d inside, L[code] outside."""
    w = torch.tensor([[0.1 * i for i in range(-16, 16)]], requires_grad=True)
    ls = LearnedScales(torch.tensor([[0.0625]]), "Q4_0")  # range -0.5 .. 0.4375: the outer weights clip
    v = ls(w)
    g = torch.linspace(-1, 1, 32)[None]
    (v * g).sum().backward()
    x = w.detach() / 0.0625
    inside = (x >= -8) & (x <= 7)
    torch.testing.assert_close(w.grad, g * inside)
    lq = (v.detach() / 0.0625).round()
    expect = (g * torch.where(inside, lq - x, lq)).sum() * 0.0625  # d log d / d log_scale = d
    torch.testing.assert_close(ls.log_scale.grad, expect.reshape(1, 1), rtol=1e-5, atol=1e-6)


def test_topk_kl_is_the_full_kl_at_full_k_and_a_lower_bound_below():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 40, generator=g) * 3, torch.randn(2, 5, 40, generator=g) * 3
    lt = F.log_softmax(t, -1)
    full = kl_divergence(t, s)
    top, idx = lt.topk(40, dim=-1)
    torch.testing.assert_close(topk_kl(top, idx, s), full, rtol=1e-5, atol=1e-6)
    top, idx = lt.topk(6, dim=-1)
    part = topk_kl(top, idx, s)
    assert 0 < float(part) < float(full)
    sl = s.clone().requires_grad_(True)
    topk_kl(top, idx, sl).backward()
    assert sl.grad.abs().sum() > 0


def test_teacher_cache_runs_the_teacher_once_per_sequence(tiny_prepared):
    from quantloop.models.checkpoints import load_hf_model

    teacher = load_hf_model(tiny_prepared).eval()
    seqs = torch.randint(3, 49152, (5, 12), generator=torch.Generator().manual_seed(0))
    cache = TeacherCache(teacher, seqs, 16)
    a = cache.get(torch.tensor([0, 3]))
    b = cache.get(torch.tensor([3, 1]))
    assert cache.teacher_passes == 3
    with torch.no_grad():
        ref = F.log_softmax(teacher(input_ids=seqs[[3]]).logits, -1).topk(16, dim=-1)
    torch.testing.assert_close(a[0][1], ref.values[0])
    torch.testing.assert_close(b[0][0], ref.values[0])
    assert torch.equal(b[1][0].long(), ref.indices[0])


def _calibration(n=10, length=24):
    return torch.randint(3, 49152, (n, length), generator=torch.Generator().manual_seed(0)).tolist()


def test_tied_embedding_is_trained_on_its_grid_by_lookup_and_head(tiny_prepared):
    """Q4_0 embedding: the lookup and the head use one fake-quantized matrix (the head's gradient reaches rows of tokens
    absent from the batch), and after QAT the embedding's grid values differ from llama.cpp's rounding of the float ones."""
    from quantloop.backends.qat.backend import QATConfig, run_qat
    from quantloop.backends.qat.grid import wrap_student
    from quantloop.models.checkpoints import load_hf_model

    teacher = load_hf_model(tiny_prepared)
    start = gb.fake_quantize(teacher.get_input_embeddings().weight.detach().numpy(), "Q4_0")

    student = load_hf_model(tiny_prepared)
    grids = wrap_student(student, "Q4_0", embedding_type="Q4_0", learn_scales=True)
    emb = grids["token_embd.weight"]
    assert "output.weight" not in grids and student.lm_head.tied_to is student.model.embed_tokens
    emb.weight.requires_grad_(True)
    ids = torch.tensor([[5, 9, 11, 9]])
    logits = student(input_ids=ids).logits
    torch.testing.assert_close(logits, F.linear(student.model(input_ids=ids).last_hidden_state, student.model.embed_tokens.current))
    logits.logsumexp(-1).sum().backward()
    seen = emb.weight.grad.abs().sum(-1) > 0
    assert seen[[5, 9, 11]].all() and seen.sum() > 1000  # the head's gradient reaches tokens the batch never looked up

    cfg = QATConfig(steps=4, batch_size=4, groups=1, progress=False, device="cpu", embedding_type="Q4_0", lr=1e-3,
                    keep_better_start=False)  # the tiny model is near its grid: 4 steps need not lower its held-out KL
    out, res, blocks = run_qat(teacher, _calibration(), cfg)
    assert res.trained_embedding and res.embedding_type == "Q4_0"
    w = out.get_input_embeddings().weight.detach().numpy()
    assert out.lm_head.weight is out.model.embed_tokens.weight  # still one tied tensor
    assert (np.abs(w - start).max(axis=1) > 0).mean() > 0.5  # most rows moved off llama.cpp's rounding of the float matrix
    t, qb = blocks["token_embd.weight"]
    np.testing.assert_array_equal(gb.dequantize(gb.pack(qb.codes, qb.scales, None, t), t), w)  # and sit on the grid they export

    frozen, _, _ = run_qat(teacher, _calibration(), QATConfig(**{**cfg.__dict__, "train_embedding": False, "learn_scales": False}))
    np.testing.assert_array_equal(frozen.get_input_embeddings().weight.detach().numpy(), start)


def test_learned_scale_qat_export_reads_back_bit_for_bit(tiny_prepared, tmp_path):
    """Q4_0 with learned scales and a Q4_0 embedding: the GGUF's bytes are the trained codes and learned fp16 scales."""
    import gguf

    from quantloop.backends.base import save_and_export
    from quantloop.backends.qat.backend import QATConfig, run_qat
    from quantloop.models.checkpoints import load_hf_model

    teacher = load_hf_model(tiny_prepared)
    float_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = QATConfig(steps=4, batch_size=4, groups=1, progress=False, device="cpu", embedding_type="Q4_0", scale_lr=1e-2)
    student, res, blocks = run_qat(teacher, _calibration(), cfg)
    assert res.learned_scales == len(blocks) == 2 * 7 + 1
    path = save_and_export(student, tiny_prepared, tmp_path, "qat_result.json", res.to_dict(), "m.gguf", "Q4_0",
                           embedding_type="Q4_0", blocks=blocks)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    state = student.state_dict()
    moved = 0
    for name, hf in [("token_embd.weight", "model.embed_tokens.weight"), ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj.weight"),
                     ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight")]:
        t, qb = blocks[name]
        raw = np.asarray(tensors[name].data)
        assert raw.tobytes() == gb.pack(qb.codes, qb.scales, None, t).tobytes()
        np.testing.assert_array_equal(gb.dequantize(raw, "Q4_0"), state[hf].numpy())
        moved += (gb.quantize_blocks(float_state[hf].numpy(), "Q4_0").scales != qb.scales).mean()
    assert moved > 0.5  # the scales written are the learned ones, not llama.cpp's of the float weights they started from


def test_gptq_start_is_gptqs_solution(tiny_prepared):
    """init gptq with no steps: the student is act-order GPTQ's weights on the grid, and closer to the teacher than RTN."""
    from quantloop.backends.gptq.grid import gptq_gguf_model_
    from quantloop.backends.qat.backend import QATConfig, run_qat
    from quantloop.gguf.torch_grid import linear_types
    from quantloop.models.checkpoints import load_hf_model

    teacher = load_hf_model(tiny_prepared)
    seqs = _calibration(12)
    cfg = QATConfig(steps=0, batch_size=4, groups=1, progress=False, device="cpu", embedding_type="F16", init="gptq", eval_sequences=3)
    student, res, _ = run_qat(teacher, seqs, cfg)
    ref = load_hf_model(tiny_prepared)
    gptq_gguf_model_(ref, seqs[:9], linear_types(ref, "Q4_0"), batch_size=4, act_order=True, progress=False)
    for name, p in ref.named_parameters():
        assert torch.equal(student.get_parameter(name), p), name
    _, rtn, _ = run_qat(teacher, seqs, QATConfig(**{**cfg.__dict__, "init": "teacher"}))
    assert res.final_kl < rtn.final_kl


def test_bad_qat_settings_are_input_errors(tiny_prepared):
    from quantloop.backends.qat.backend import QATConfig, run_qat
    from quantloop.models.checkpoints import load_hf_model

    teacher = load_hf_model(tiny_prepared)
    for bad in ({"init": "random"}, {"teacher_top_k": -1}):
        with pytest.raises(InputError):
            run_qat(teacher, _calibration(), QATConfig(steps=1, progress=False, device="cpu", **bad))
