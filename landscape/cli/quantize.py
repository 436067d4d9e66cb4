"""``landscape quantize``: quantize a model's decoder-block linears and save the :class:`QuantResult`.

The methods are those of the registry, :data:`landscape.quant.methods.METHODS` (``rtn``, ``gptq``,
``gptq-noact``, ``qaft``, ``fp-finetune``, ``llm-qat``, ``<base>+lorc``...): the command turns its flags into
one :class:`~landscape.quant.methods.QuantJob` and runs the method on it, so a method registered there is
available here with no change.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from landscape import data
from landscape.cli.common import (
    Command,
    check_memory,
    default_seq_len,
    format_arg,
    limit_arguments,
    load,
    model_argument,
    positive_float,
    positive_int,
    progress_argument,
    text_argument,
    work_limits,
)
from landscape.quant.capture import resolve_layers
from landscape.quant.gptq import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP, GPTQSettings
from landscape.quant.lorc import DEFAULT_RANK
from landscape.quant.lr_selection import LearningRateSweepSettings
from landscape.quant.methods import METHODS, QuantJob, run_method
from landscape.quant.qaft import DEFAULT_LR, OPTIMIZERS, FinetuneSettings, LearningRateSweep
from landscape.quant.result import QuantResult, check_result_path


def _learning_rate(text: str) -> float | str:
    """``auto`` or a learning rate >= 0."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a learning rate >= 0 or 'auto', got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a learning rate >= 0 or 'auto', got {text!r}")
    return value


def quantize_arguments(p: argparse.ArgumentParser) -> None:
    limit_arguments(p, "optimiser steps")
    methods = "; ".join(f"{name}: {m.description}" for name, m in METHODS.items())
    model_argument(p)
    p.add_argument("--method", required=True, choices=sorted(METHODS),
                   help=f"quantization method ({methods})")
    p.add_argument("--format", required=True, type=format_arg, dest="fmt", metavar="FORMAT",
                   help="weight format: int4, int3-g128, int4-sym, int8-tensor, mxint4-32 ...")
    p.add_argument("--out", required=True, help="output path: writes PATH.safetensors and PATH.json (an "
                                                 "existing result there is refused, see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a saved result already at --out (otherwise refused before any work)")
    p.add_argument("--calib-sequences", type=positive_int, default=128,
                   help="calibration sequences (default 128, the study's data budget)")
    p.add_argument("--calib-seq-len", type=positive_int, default=None,
                   help="tokens per calibration sequence (default 512 for smollm2-135m, else "
                        "min(256, context))")
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    text_argument(p, "calibration (its training documents; default: the bundled wiki text)")
    p.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="GPTQ: process columns in natural order instead of decreasing diag(H)")
    p.add_argument("--damp", type=positive_float, default=DEFAULT_DAMP,
                   help=f"GPTQ relative damping, x mean diag(H) (default {DEFAULT_DAMP}; escalates x10 on "
                        f"failure)")
    p.add_argument("--block-size", type=positive_int, default=DEFAULT_BLOCK_SIZE,
                   help=f"GPTQ lazy-update block in columns (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--rank", type=positive_int, default=DEFAULT_RANK,
                   help=f"LoRC rank (default {DEFAULT_RANK}; only for *+lorc methods)")
    p.add_argument("--layers", action="append", default=None, metavar="GLOB",
                   help="quantize only layers matching this glob (repeatable), e.g. '*.mlp.*'; default all")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="calibration segments per forward pass")
    p.add_argument("--lr", type=_learning_rate, default=DEFAULT_LR,
                   help=f"qaft / fp-finetune / llm-qat peak learning rate, or 'auto' (qaft, fp-finetune): "
                        f"chosen on 16 held-back calibration sequences (default {DEFAULT_LR:g})")
    p.add_argument("--steps", type=positive_int, default=None, help="fine-tuning steps (default: --epochs)")
    p.add_argument("--epochs", type=positive_float, default=1.0,
                   help="fine-tuning passes over the sequences")
    p.add_argument("--train-batch-size", type=positive_int, default=4, help="fine-tuning sequences per step")
    p.add_argument("--micro-batch-size", type=positive_int, default=None,
                   help="sequences per forward/backward pass (memory only: gradients summed over a step's "
                        "micro-batches, equal up to float rounding; default: the whole batch)")
    p.add_argument("--recompute-blocks", action="store_true",
                   help="keep only each decoder block's input through the backward pass and run the "
                        "block again there (activation checkpointing: memory only, the same result bit for "
                        "bit, one more forward pass per step)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning data-order seed")
    p.add_argument("--distill-weight", type=float, default=None,
                   help="weight a of the KL to the fp model in (1-a) NLL + a KL (default: 0 for qaft and "
                        "fp-finetune, 1 for llm-qat)")
    p.add_argument("--learned-scales", action="store_true", help="qaft: LSQ-style learned per-group scales")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="adamw (default; 4 float32 copies of the trained layers) or sgd with momentum (3 "
                        "copies, for large models; its --lr is per unit gradient: use --lr auto)")
    p.add_argument("--momentum", type=float, default=0.9, help="sgd's heavy-ball momentum (default 0.9)")
    progress_argument(p)


def finetune_settings(args: argparse.Namespace) -> FinetuneSettings | None:
    """The fine-tuning settings of ``--method`` from the flags (None for a method that does not fine-tune)."""
    defaults = METHODS[args.method].finetune_defaults
    if defaults is None:
        return None
    distill_weight = defaults.distill_weight if args.distill_weight is None else args.distill_weight
    lr = defaults.lr if args.lr == "auto" else args.lr  # auto: chosen by the job's sweep (QuantJob.lr_sweep)
    return replace(defaults, lr=lr, epochs=args.epochs, steps=args.steps, batch_size=args.train_batch_size,
                   seed=args.seed, distill_weight=distill_weight, learned_scales=args.learned_scales,
                   optimizer=args.optimizer, momentum=args.momentum, micro_batch_size=args.micro_batch_size,
                   recompute_blocks=args.recompute_blocks)


def _print_sweep(result: QuantResult) -> None:
    """The learning-rate sweep of ``--lr auto`` as a table (also when it chose the rate of a +lorc base)."""
    recorded = result.extra.get("lr_selection") or result.extra.get("base_extra", {}).get("lr_selection")
    if recorded:
        print(LearningRateSweep(**recorded).table())


FINETUNE_FLAGS = ("lr", "steps", "epochs", "train_batch_size", "micro_batch_size", "recompute_blocks", "seed",
                  "distill_weight", "learned_scales", "optimizer", "momentum")
GPTQ_FLAGS = ("act_order", "damp", "block_size")


def unused_flags(args: argparse.Namespace) -> list[str]:
    """The flags given (not at their defaults) that ``--method`` does not use: fine-tuning flags for a method
    that does not train, GPTQ's for one that does not run GPTQ, ``--rank`` without LoRC."""
    defaults = argparse.ArgumentParser()
    quantize_arguments(defaults)
    method = args.method
    unused = [*(() if METHODS[method].finetune_defaults is not None else FINETUNE_FLAGS),
              *(() if method.startswith("gptq") else GPTQ_FLAGS), *(() if "lorc" in method else ("rank",))]
    return [("--no-act-order" if name == "act_order" else "--" + name.replace("_", "-"))
            for name in unused if getattr(args, name) != defaults.get_default(name)]


def run_quantize(args: argparse.Namespace) -> int:
    # an unwritable --out, or a saved result already there, fails before the model loads
    check_result_path(args.out, args.overwrite)
    if unused := unused_flags(args):
        trained = ", ".join(m for m in sorted(METHODS) if METHODS[m].finetune_defaults)
        raise ValueError(f"--method {args.method} does not use {', '.join(unused)}: drop them (fine-tuning "
                         f"flags apply to {trained}; GPTQ flags to the gptq methods; --rank to +lorc ones)")
    gptq_settings = GPTQSettings(damp=args.damp, block_size=args.block_size, act_order=args.act_order)
    finetune = finetune_settings(args)  # bad settings fail before the model loads, too
    if finetune is not None:
        work_limits(args).check_points(f"this {args.method} run (optimiser steps)",
                                       finetune.steps_for(args.calib_sequences))
    t0 = time.perf_counter()
    lm = load(args)
    # the result, and a fine-tuning method's float32 latent weights, gradients and optimiser moments
    state = 0.5 if args.method.startswith("gptq") else 0.0
    if finetune is not None:
        state = 3.0 if finetune.optimizer == "sgd" else 4.0
    steps = finetune.steps_for(args.calib_sequences) if finetune is not None else 1
    check_memory(lm, args, f"this {args.method} run", steps, 1 + state + ("lorc" in args.method),
                 "--layers for fewer layers, or --optimizer sgd (one moment less)")
    # layer globs, format vs shapes, finite weights: before any data
    resolve_layers(lm.model, args.layers, args.fmt)
    seq_len = args.calib_seq_len or default_seq_len(lm.info)
    calib = data.calibration_set(lm.tokenizer, args.calib_sequences, seq_len, args.calib_seed,
                                 corpus=args.text or "wiki", context_length=lm.info.context_length)
    job = QuantJob(lm.base, calib, args.fmt, layers=args.layers, gptq=gptq_settings, finetune=finetune,
                   lorc_rank=args.rank, lr_sweep=LearningRateSweepSettings() if args.lr == "auto" else None,
                   batch_size=args.batch_size, progress=not args.no_progress)
    result = run_method(args.method, job)
    _print_sweep(result)
    path = result.save(args.out, overwrite=args.overwrite)
    n_weights = sum(w.numel() for w in result.weights.values())
    bits = result.storage_bits()
    print(f"model    {lm.info.name} ({lm.info.source})")
    if lm.info.caveat:
        print(f"caveat   {lm.info.caveat}")
    print(f"method   {result.method}  format {result.format.name if result.format else 'fp32'}  "
          f"({len(result.weights)} layers, {bits / n_weights:.3f} bits per weight incl. scales)")
    print(f"calib    {calib.n_segments} x {calib.seq_len} tokens, {calib.corpus}/{calib.split}, "
          f"seed {calib.seed}, data {calib.content_hash}")
    print(f"seconds  {result.seconds:.2f} (method), {time.perf_counter() - t0:.2f} (total)")
    inputs = result.extra.get("layer_mse_inputs", "full-precision model")
    print(f"layer MSE summed over layers: {result.total_layer_mse:.6g} (inputs: {inputs})")
    print(f"saved    {path}.safetensors and {path}.json")
    return 0



COMMANDS = (Command("quantize",
                    "quantize a model's linear layers (rtn, gptq, qaft, llm-qat, +lorc; fp-finetune "
                    "control) and save the result", quantize_arguments, run_quantize),)
