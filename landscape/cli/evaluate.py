"""``landscape eval`` (held-out NLL with its convention, optionally after round-to-nearest) and
``landscape build-model`` (train a reference model, or convert SmolLM2-135M, into the cache; check a cached
one and rebuild it when damaged)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from landscape import data, models
from landscape.cache import BUILD_FILE, CacheEntry
from landscape.cli.common import (
    Command,
    data_arguments,
    format_arg,
    heldout,
    load,
    model_argument,
    positive_int,
)
from landscape.data import corpus_label
from landscape.documents import document_nll
from landscape.objectives import nll
from landscape.quant import rtn
from landscape.refmodel import REF_CONFIGS, reference_model_entry
from landscape.weights import swapped_weights


def eval_arguments(p: argparse.ArgumentParser) -> None:
    model_argument(p)
    data_arguments(p, segments=24, many_corpora=True)
    p.add_argument("--rtn", action="append", default=[], metavar="FORMAT", type=format_arg,
                   help="also evaluate round-to-nearest at this format (repeatable), e.g. int4, int3-g64")
    p.add_argument("--json", action="store_true", help="print one JSON object per result")
    g = p.add_argument_group("convention")
    g.add_argument("--convention", choices=("token", "lm-eval"), default="token",
                   help="token: token-mean NLL over fixed windows (the toolkit's; default); lm-eval: whole "
                        "held-out documents in rolling windows, with word perplexity, byte perplexity and "
                        "bits per byte as lm-evaluation-harness reports them")
    g.add_argument("--documents", type=positive_int, default=None,
                   help="lm-eval: the first N held-out documents (default 50)")
    g.add_argument("--max-length", type=positive_int, default=None,
                   help="lm-eval: window length (default: the model's context length)")


def run_eval(args: argparse.Namespace) -> int:
    corpora = [args.text] if args.text else args.corpus or ["wiki", "sotu"]
    if args.convention == "token" and (args.documents is not None or args.max_length is not None):
        raise ValueError("--documents and --max-length belong to --convention lm-eval")
    t0 = time.time()
    lm = load(args)
    load_s = time.time() - t0
    if args.convention == "lm-eval":
        texts = {c: data.documents(c, "heldout")[:args.documents or 50] for c in corpora}
        sets = [(c, texts[c], args.max_length or lm.info.context_length) for c in corpora]
    else:
        sets = [heldout(lm, args, c) for c in corpora]
    if not args.json:
        print(f"model {lm.info.name} ({lm.info.source}; {lm.info.n_params:,} parameters; loaded in "
              f"{load_s:.1f} s)")
        if lm.info.caveat:
            print(f"caveat: {lm.info.caveat}")
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
    unquantized = short[str(lm.base.dtype).removeprefix("torch.")]  # the model as loaded, in its dtype
    variants: list[tuple[str, dict]] = [(unquantized, {})]
    for fmt in args.rtn:  # parsed (and so checked) by argparse, before the model loads
        variants.append((f"rtn {fmt.name}", rtn(lm.base, fmt).weights))
    for label, weights in variants:
        for held in sets:
            t = time.time()
            if args.convention == "lm-eval":
                with swapped_weights(lm.model, weights):
                    doc = document_nll(lm.model, lm.tokenizer, held[1], held[2], corpus_label(held[0]),
                                       model_name=lm.info.name)
                print(json.dumps({"variant": label, **doc.to_dict(), "seconds": time.time() - t}) if args.json
                      else f"{label:>16}  word ppl {doc.word_perplexity:.3f}  bits/byte "
                           f"{doc.bits_per_byte:.4f}  byte ppl {doc.byte_perplexity:.4f}  token NLL "
                           f"{doc.token_nll:.4f}  ({doc.describe()}; {time.time() - t:.1f} s)")
                continue
            with swapped_weights(lm.model, weights):
                r = nll(lm.model, held, batch_size=args.batch_size, model_name=lm.info.name)
            if args.json:
                print(json.dumps({"variant": label, "nll": r.value, "seconds": time.time() - t,
                                  "convention": r.convention.to_dict()}))
            else:
                print(f"{label:>16}  {r.value:.4f}  ({r.convention.describe()}; {time.time() - t:.1f} s)")
    return 0


def build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name",
                   help="a reference model name (ref-small, ref-tiny) or smollm2-135m (GGUF conversion)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if cached and intact (without it, a cached entry is checked against "
                        "its manifest and rebuilt only when damaged)")


ENTRY_STATES = {
    "intact": "intact: every file matches its manifest",
    "built": "built",
    "adopted": "built by an older landscape: its files look sound (their bytes could not be checked) and "
               "their manifest is written now; --force rebuilds it",
}


def describe_entry(entry: CacheEntry) -> str:
    """One line on what ``build-model`` found and did."""
    if entry.state == "rebuilt":
        return ("rebuilt (--force)" if entry.problem == "--force"
                else f"repaired: it was damaged ({entry.problem}) and is rebuilt")
    return ENTRY_STATES[entry.state]


def run_build(args: argparse.Namespace) -> int:
    if args.name == "smollm2-135m":
        entry = models.smollm2_entry(force=args.force, repair=True)
        print(f"{entry.path}\n{describe_entry(entry)}")
        return 0
    if args.name not in REF_CONFIGS:
        print(f"error: cannot build {args.name!r}; buildable: smollm2-135m, {', '.join(sorted(REF_CONFIGS))}",
              file=sys.stderr)
        return 2
    entry = reference_model_entry(args.name, force=args.force, repair=True)
    meta = json.loads((entry.path / BUILD_FILE).read_text())
    print(f"{entry.path}\n{describe_entry(entry)}\n"
          f"held-out NLL {meta['heldout_nll']:.4f} ({meta['train_seconds']} s to train)")
    return 0


COMMANDS = (
    Command("eval", "held-out NLL of a model (with its convention), optionally after round-to-nearest",
            eval_arguments, run_eval),
    Command("build-model", "train a reference model (or convert smollm2-135m) into the cache, or check the "
            "cached one and rebuild it if damaged",
            build_arguments, run_build),
)
