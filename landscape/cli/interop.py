"""``landscape import`` (a quantized checkpoint of another tool as a saved result against its base) and
``landscape export`` (a saved result as a checkpoint other tools load)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from landscape import models
from landscape.cli.common import Command, load, model_argument
from landscape.interop import import_checkpoint, read_checkpoint_kind
from landscape.interop.export import EXPORT_FORMATS, LAYOUT, check_exportable, export_compressed_tensors
from landscape.outputs import check_output_path
from landscape.quant.result import QuantResult, check_result_path, read_result_metadata
from landscape.weights import get_layer, weight_matrix


def import_arguments(p: argparse.ArgumentParser) -> None:
    model_argument(p)
    p.add_argument("checkpoint", type=Path,
                   help="a GGUF file, or the quantized checkpoint's folder (config.json with "
                        "quantization_config, *.safetensors): GPTQ-packed (quant_method gptq, v1 or v2 zero "
                        "points)")
    p.add_argument("--out", required=True, type=Path,
                   help="result path stem (writes <out>.safetensors and <out>.json; an existing result there "
                        "is refused, see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a saved result already at --out")


def run_import(args: argparse.Namespace) -> int:
    check_result_path(args.out, args.overwrite)  # before the checkpoint or the model is read
    kind, config = read_checkpoint_kind(args.checkpoint)
    t0 = time.perf_counter()
    lm = load(args)
    result = import_checkpoint(lm.base, args.checkpoint)
    path = result.save(args.out, overwrite=args.overwrite)
    grid = result.extra["checkpoint_grid"]
    d = torch.sqrt(sum((w.double() - weight_matrix(get_layer(lm.model, n)).detach().double()).pow(2).sum()
                       for n, w in result.weights.items()))
    print(f"model    {lm.info.name} ({lm.info.source})")
    if kind == "gguf":
        print(f"import   {args.checkpoint} (GGUF, {config['architecture']}; quantized linears: "
              f"{grid['tensor_types']})")
    else:
        print(f"import   {args.checkpoint} ({kind}: {config.get('bits')} bits, group {grid['group_size']}, "
              f"{'symmetric' if grid['sym'] else 'asymmetric'}, act-order {grid['desc_act']}, "
              f"{grid['checkpoint_format']} zero points)")
    print(f"result   {result.label}: {len(result.weights)} layers, ||w_q - w0|| {float(d):.4g}"
          + ("" if grid["on_our_grid"] else f"; its lattice is not {grid['nearest_format']}'s on w0"))
    print(f"seconds  {time.perf_counter() - t0:.2f}")
    print(f"saved    {path}.safetensors and {path}.json")
    return 0


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("result", help="a saved result (path stem of its .safetensors and .json)")
    p.add_argument("--format", dest="target", choices=EXPORT_FORMATS, default="compressed-tensors",
                   help="the checkpoint format (compressed-tensors: llm-compressor's and vLLM's, which "
                        "transformers loads)")
    p.add_argument("--out", required=True, type=Path, help="a new folder for the checkpoint")
    p.add_argument("--model", default=None,
                   help="the result's base model (default: the one it records, a built-in name or path)")
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out")


def run_export(args: argparse.Namespace) -> int:
    meta = read_result_metadata(args.result)  # a missing or damaged result fails here
    fmt = check_exportable(meta, args.target)  # a format the target cannot hold, before any model loads
    if args.out.exists() and (not args.out.is_dir() or (any(args.out.iterdir()) and not args.overwrite)):
        raise ValueError(f"--out {args.out} exists and is not an empty folder: give a new folder, or "
                         f"--overwrite")
    check_output_path(args.out / "config.json")
    t0 = time.perf_counter()
    lm = models.load_model(args.model or meta["base_model"])
    result = QuantResult.load(args.result, base=lm.base)  # its base's fingerprint and its grid, checked
    export_compressed_tensors(lm.model, lm.tokenizer, result, args.out)
    print(f"exported {result.label} ({len(result.weights)} layers, {fmt.name}) on {lm.info.name} to "
          f"{args.out} as {args.target} ({LAYOUT}) in {time.perf_counter() - t0:.1f} s; load it with "
          f"AutoModelForCausalLM.from_pretrained('{args.out}')")
    return 0


COMMANDS = (Command("import", "a quantized checkpoint of another tool (compressed-tensors, GGUF, "
                              "GPTQ-packed) as a result against its full-precision base", import_arguments,
                    run_import),
            Command("export", "a saved result as a checkpoint other tools load (compressed-tensors)",
                    export_arguments, run_export))
