"""``landscape quantize``: quantize a model's decoder-block linears and save the :class:`QuantResult`.

Methods live in :data:`METHODS` (name -> runner); a runner takes the loaded model, the calibration set,
the format and the parsed arguments and returns a :class:`QuantResult`. ``"<base>+lorc"`` adds a
LoRC correction (``--rank``) on top of any base method, so registering a new base method (``qaft``,
``fp-finetune``, ``llm-qat``) is one entry here.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from landscape.cli import command, default_seq_len, format_arg
from landscape.data import TokenSet
from landscape.models import LoadedModel
from landscape.quant.formats import QuantFormat
from landscape.quant.result import QuantResult

MethodRunner = Callable[[LoadedModel, TokenSet, QuantFormat, argparse.Namespace], QuantResult]


def _run_rtn(lm: LoadedModel, calib: TokenSet, fmt: QuantFormat, args: argparse.Namespace) -> QuantResult:
    from landscape.quant.rtn import rtn

    return rtn(lm.model, fmt, layers=args.layers, calib=calib, batch_size=args.batch_size, model_name=lm.info.name)


def _run_gptq(lm: LoadedModel, calib: TokenSet, fmt: QuantFormat, args: argparse.Namespace) -> QuantResult:
    from landscape.quant.gptq import gptq

    return gptq(lm.model, calib, fmt, damp=args.damp, block_size=args.block_size, act_order=args.act_order,
                layers=args.layers, batch_size=args.batch_size, progress=not args.no_progress,
                model_name=lm.info.name)


def _lr(lm: LoadedModel, calib: TokenSet, fmt: QuantFormat | None, args: argparse.Namespace, quantize: bool):
    """``--lr`` as a number, or ``auto``: a sweep on a held-back part of the calibration set (never held-out text)."""
    if args.lr != "auto":
        return float(args.lr)
    from landscape.quant.qaft import select_learning_rate

    sweep = select_learning_rate(lm.model, calib, fmt, steps=args.steps, layers=args.layers, quantize=quantize,
                                 progress=not args.no_progress)
    print(sweep.table())
    return sweep


def _finetune_kwargs(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "epochs": args.epochs, "batch_size": args.train_batch_size, "seed": args.seed,
            "layers": args.layers, "progress": not args.no_progress}


def _run_qaft(lm: LoadedModel, calib: TokenSet, fmt: QuantFormat, args: argparse.Namespace) -> QuantResult:
    from landscape.quant.qaft import qaft

    return qaft(lm.model, calib, fmt, lr=_lr(lm, calib, fmt, args, True), distill_weight=args.distill_weight,
                learned_scales=args.learned_scales, model_name=lm.info.name, **_finetune_kwargs(args))


def _run_fp_finetune(lm: LoadedModel, calib: TokenSet, fmt: QuantFormat, args: argparse.Namespace) -> QuantResult:
    from landscape.quant.qaft import fp_finetune

    return fp_finetune(lm.model, calib, fmt, lr=_lr(lm, calib, fmt, args, False), distill_weight=args.distill_weight,
                       model_name=lm.info.name, **_finetune_kwargs(args))


def _run_llm_qat(lm: LoadedModel, calib: TokenSet, fmt: QuantFormat, args: argparse.Namespace) -> QuantResult:
    from landscape.quant.llm_qat import llm_qat

    lr = float(args.lr) if args.lr != "auto" else None
    if lr is None:
        raise ValueError("--lr auto is not available for llm-qat (its text is generated, there is no calibration "
                         "split to select on); give a number")
    return llm_qat(lm.model, fmt, calib.seq_len, n_sequences=calib.n_segments, lr=lr, model_name=lm.info.name,
                   **_finetune_kwargs(args))


def with_lorc(base_method: str) -> MethodRunner:
    """A runner for ``f"{base_method}+lorc"``: the base method, then a rank ``args.rank`` LoRC correction."""

    def run(lm: LoadedModel, calib: TokenSet, fmt: QuantFormat, args: argparse.Namespace) -> QuantResult:
        from landscape.quant.lorc import lorc

        base = METHODS[base_method](lm, calib, fmt, args)
        return lorc(lm.model, base, rank=args.rank, calib=calib, batch_size=args.batch_size,
                    progress=not args.no_progress)

    return run


METHODS: dict[str, MethodRunner] = {
    "rtn": _run_rtn,
    "gptq": _run_gptq,
    "qaft": _run_qaft,
    "fp-finetune": _run_fp_finetune,
    "llm-qat": _run_llm_qat,
    "rtn+lorc": with_lorc("rtn"),
    "gptq+lorc": with_lorc("gptq"),
    "qaft+lorc": with_lorc("qaft"),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _quantize_args(p: argparse.ArgumentParser) -> None:
    from landscape.quant.gptq import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP
    from landscape.quant.lorc import DEFAULT_RANK

    p.add_argument("model", help="smollm2-135m, ref-small, ref-tiny, a hub id or a local directory")
    p.add_argument("--method", required=True, choices=sorted(METHODS), help="quantization method")
    p.add_argument("--format", required=True, type=format_arg, dest="fmt", metavar="FORMAT",
                   help="weight format: int4, int3-g128, int4-sym, int8-tensor, mxint4-32 ...")
    p.add_argument("--out", required=True, help="output path: writes PATH.safetensors and PATH.json")
    p.add_argument("--calib-sequences", type=_positive_int, default=128,
                   help="calibration sequences (default 128, the study's data budget)")
    p.add_argument("--calib-seq-len", type=_positive_int, default=None,
                   help="tokens per calibration sequence (default 512 for smollm2-135m, else min(256, context))")
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="GPTQ: process columns in natural order instead of decreasing diag(H)")
    p.add_argument("--damp", type=_positive_float, default=DEFAULT_DAMP,
                   help=f"GPTQ relative damping, x mean diag(H) (default {DEFAULT_DAMP}; escalates x10 on failure)")
    p.add_argument("--block-size", type=_positive_int, default=DEFAULT_BLOCK_SIZE,
                   help=f"GPTQ lazy-update block in columns (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--rank", type=_positive_int, default=DEFAULT_RANK,
                   help=f"LoRC rank (default {DEFAULT_RANK}; only for *+lorc methods)")
    p.add_argument("--layers", action="append", default=None, metavar="GLOB",
                   help="quantize only layers matching this glob (repeatable), e.g. '*.mlp.*'; default all")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="calibration segments per forward pass")
    p.add_argument("--lr", default="3e-4",
                   help="qaft / fp-finetune / llm-qat peak learning rate, or 'auto' (qaft, fp-finetune): chosen on "
                        "16 held-back calibration sequences (default 3e-4)")
    p.add_argument("--steps", type=_positive_int, default=None, help="fine-tuning steps (default: --epochs)")
    p.add_argument("--epochs", type=_positive_float, default=1.0, help="fine-tuning passes over the sequences")
    p.add_argument("--train-batch-size", type=_positive_int, default=4, help="fine-tuning sequences per step")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning data-order seed")
    p.add_argument("--distill-weight", type=float, default=0.0,
                   help="weight a of the KL to the fp model in (1-a) NLL + a KL (qaft, fp-finetune)")
    p.add_argument("--learned-scales", action="store_true", help="qaft: LSQ-style learned per-group scales")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("quantize", "quantize a model's linear layers (rtn, gptq, qaft, llm-qat, +lorc; fp-finetune control) "
                     "and save the result")
def cmd_quantize(args: argparse.Namespace) -> int:
    from landscape.data import calibration_set
    from landscape.models import load_model
    from landscape.outputs import check_output_path
    from landscape.quant.capture import resolve_layers
    from landscape.quant.result import result_stem

    check_output_path(f"{result_stem(args.out)}.json")  # an unwritable --out fails before the model loads
    t0 = time.perf_counter()
    lm = load_model(args.model)
    resolve_layers(lm.model, args.layers, args.fmt)  # layer globs, format vs shapes, finite weights: before any data
    seq_len = args.calib_seq_len or default_seq_len(lm.info)
    calib = calibration_set(lm.tokenizer, args.calib_sequences, seq_len, args.calib_seed,
                            context_length=lm.info.context_length)
    result = METHODS[args.method](lm, calib, args.fmt, args)
    path = result.save(args.out)
    n_weights = sum(w.numel() for w in result.weights.values())
    bits = result.storage_bits()
    print(f"model    {lm.info.name} ({lm.info.source})")
    if lm.info.caveat:
        print(f"caveat   {lm.info.caveat}")
    print(f"method   {result.method}  format {result.format.name if result.format else 'fp32'}  ({len(result.weights)} layers, "
          f"{bits / n_weights:.3f} bits per weight incl. scales)")
    print(f"calib    {calib.n_segments} x {calib.seq_len} tokens, {calib.corpus}/{calib.split}, seed {calib.seed}, "
          f"data {calib.content_hash}")
    print(f"seconds  {result.seconds:.2f} (method), {time.perf_counter() - t0:.2f} (total)")
    inputs = result.extra.get("layer_mse_inputs", "full-precision model")
    print(f"layer MSE summed over layers: {result.total_layer_mse:.6g} (inputs: {inputs})")
    print(f"saved    {path}.safetensors and {path}.json")
    return 0


cmd_quantize.add_arguments = _quantize_args
