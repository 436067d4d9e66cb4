"""QAFT learning-rate selection on the calibration budget alone (issues #4 and #11).

    python -m analyses.lr_sweep --model smollm2-135m --formats int3 int4 --out results/lr_sweep.json

For each format (``fp32``: the full-precision control, which gets its own rate),
:func:`landscape.quant.lr_selection.select_learning_rate` splits the 128 calibration sequences
(seeded) into 112 training and 16 validation sequences, trains QAFT on the 112 with each candidate rate
(every other setting as in the quantization table: one epoch, batch 4, seed 0) and measures the token-mean
NLL of the snapped result on the 16. Held-out text is never read. Writes every sweep (rates, validation
NLLs, the split, the calibration hash, seconds) to one JSON file, finished formats kept on a rerun, and
prints each as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from analyses.session import load_model_of, model_options
from landscape.data import calibration_set
from landscape.quant import parse_format
from landscape.quant.lr_selection import (
    DEFAULT_VALIDATION_SEQUENCES,
    LearningRateSweepSettings,
    select_learning_rate,
)
from landscape.quant.qaft import FinetuneSettings, LearningRateSweep


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(p)
    p.add_argument("--formats", nargs="+", default=["int3", "int4"],
                   help="QAFT formats; 'fp32' sweeps the full-precision control (fp-finetune) instead")
    p.add_argument("--candidates", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--calib-sequences", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--validation", type=int, default=DEFAULT_VALIDATION_SEQUENCES)
    p.add_argument("--out", default="results/lr_sweep.json")
    args = p.parse_args(argv)
    # bad ones fail before loading
    formats = [f if f == "fp32" else parse_format(f).name for f in args.formats]
    if any(c <= 0 for c in args.candidates):
        p.error(f"--candidates must be learning rates > 0, got {args.candidates}")
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {}
    lm = load_model_of(args)
    calib = calibration_set(lm.tokenizer, args.calib_sequences, args.calib_seq_len, 0,
                            context_length=lm.info.context_length)
    for fmt in formats:
        key = (f"{args.model}/{fmt}/{calib.content_hash}/"
               + ",".join(f"{c:g}" for c in sorted(args.candidates)))
        if key not in done:
            # the control: the same loop with the quantizer off, its own learning rate
            control = fmt == "fp32"
            search = LearningRateSweepSettings(tuple(args.candidates), n_validation=args.validation)
            sweep = select_learning_rate(lm.base, calib, None if control else fmt,
                                         FinetuneSettings(quantize=not control), search)
            done[key] = sweep.to_dict()
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(done, indent=1))
            os.replace(tmp, out)  # a finished sweep is never lost, a half-written file never seen
        s = done[key]
        method = "fp-finetune (control)" if fmt == "fp32" else "QAFT"
        print(f"\n## {args.model} {fmt}: {method} lr on {len(s['train_sequences'])} calibration sequences, "
              f"validated on {len(s['validation_sequences'])} (token-mean NLL, {args.calib_seq_len}-token "
              f"sequences; {s['seconds']:.0f} s)\n")
        print(LearningRateSweep(**s).table())


if __name__ == "__main__":
    main()
