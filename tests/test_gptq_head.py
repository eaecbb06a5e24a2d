"""GPTQ of the output projection (a tied token embedding included) onto a 4-bit GGUF grid: it uses the Hessian of
what the projection reads (the final normed hidden states), and the file holds its codes bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import torch

from quantloop.backends.gptq.grid import grid_gptq_weight, gptq_gguf_model_, head_tensor_name
from quantloop.gguf import blocks as gb
from quantloop.gguf.torch_grid import linear_types
from quantloop.models.checkpoints import load_hf_model


def _sequences(n: int = 8, length: int = 48, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (n, length), generator=g).tolist()


def _inputs_of(module, model, sequences) -> torch.Tensor:
    """Every row `module` receives while the model reads the sequences (batches of 8, as GPTQ runs them)."""
    seen = []
    handle = module.register_forward_hook(lambda _, inp, __: seen.append(inp[0].reshape(-1, inp[0].shape[-1]).float()))
    try:
        with torch.no_grad():
            for ids in torch.split(torch.tensor(sequences), 8):
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen)


def test_head_gptq_uses_the_final_normed_hidden_states(tiny_copy):
    model = load_hf_model(tiny_copy)
    sequences = _sequences()
    types = linear_types(model, "Q4_0")
    layers_only = copy.deepcopy(model)
    blocks: dict = {}
    gptq_gguf_model_(model, sequences, types, blocks=blocks, head_type="Q4_0", progress=False)
    gptq_gguf_model_(layers_only, sequences, types, progress=False)  # the same layers, head untouched

    head_in = _inputs_of(layers_only.lm_head, layers_only, sequences)  # final norm outputs
    embed_out = _inputs_of(layers_only.model.layers[0], layers_only, sequences)  # what the embedding lookup gives
    w0 = layers_only.lm_head.weight.detach()
    want, t, _ = grid_gptq_weight(w0, head_in.T @ head_in, "Q4_0")
    wrong, _, _ = grid_gptq_weight(w0, embed_out.T @ embed_out, "Q4_0")
    got = model.lm_head.weight.detach()

    assert t == "Q4_0" and head_tensor_name(model) == "token_embd.weight"
    assert model.get_input_embeddings().weight is model.lm_head.weight  # lookup and head: one grid
    same_as_want = (got == want).float().mean().item()
    same_as_wrong = (got == wrong).float().mean().item()
    assert same_as_want > 0.999, same_as_want
    assert same_as_wrong < 0.98, same_as_wrong  # the control: the other Hessian gives other codes
    # on the grid, with the blocks the export will write
    bt, qb = blocks["token_embd.weight"]
    deq = gb.dequantize(gb.pack(qb.codes, qb.scales, qb.mins, bt), bt)
    np.testing.assert_array_equal(deq, got.numpy())
    # and it beats llama.cpp's rounding of the same weights on what the head reads
    rtn = torch.from_numpy(gb.fake_quantize(w0.numpy(), "Q4_0"))
    err = lambda w: torch.linalg.norm(head_in @ (w - w0).T).item()  # noqa: E731
    assert err(got) < 0.95 * err(rtn), (err(got), err(rtn))


def test_whole_file_4bit_gptq_export_carries_the_head_codes(tiny_copy, dataset_dir, tmp_path):
    """Every weight of the file at Q4_0, embedding included: the GGUF's token_embd holds GPTQ's codes bit for bit,
    and llama.cpp reads the file."""
    import json

    from gguf import GGUFReader
    from safetensors.numpy import load_file

    from quantloop.eval.runtimes import LlamaCppRunner
    from quantloop.schemas import CalibrationSpec, quant_spec
    from quantloop.tools.quantize import quantize_model

    spec = quant_spec(method="gptq", gguf_type="Q4_0",
                     layer_types={"embeddings": "Q4_0", "attention": "Q4_0", "feed_forward": "Q4_0"},
                     calibration=CalibrationSpec(dataset_dir=str(dataset_dir), samples=8, seqlen=64))
    r = quantize_model(tiny_copy, tmp_path / "q", spec)
    tensors = {t.name: t for t in GGUFReader(r.model_path).tensors}
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == "Q4_0" and "output.weight" not in tensors
    state = load_file(tmp_path / "q" / "model.safetensors")
    np.testing.assert_array_equal(gb.dequantize(emb.data, "Q4_0"), state["model.embed_tokens.weight"])
    res = json.loads((tmp_path / "q" / "gptq_result.json").read_text())
    assert res["head"] == "Q4_0" and res["export"]["from_quantizer"] == res["export"]["quantized_tensors_read_back"]
    runner = LlamaCppRunner(r.model_path, n_ctx=64)
    assert np.isfinite(runner.logits(runner.tokenize("To be, or not to be"))).all()
