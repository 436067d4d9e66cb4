"""Does layer MSE track NLL inside the basin and stop tracking it outside? (issue #6, finding 2 against 3)

    python -m analyses.misalignment_basin --model smollm2-135m --results results/quant_table/results \\
        --radius 114.6 --out results/misalignment_basin.h5

Figure 3's candidates all lie outside R(w0) on SmolLM2 (every 2-4-bit displacement is 2-6 R long), so its
correlation cannot be split at R. This study adds candidates inside and around the basin: RTN and GPTQ at
8, 6 and 5 bits (per-channel displacements of about 0.15, 0.6 and 1.2 R) and random on-grid roundings of w0
at 8, 6, 5 and 4 bits (:class:`landscape.studies.candidates.RoundingSpec`), next to every saved result of the
quantization tables made on the same calibration set (RTN, GPTQ, GPTQ without act-order, GPTQ + LoRC,
QAFT seed 0). Every candidate's summed layer MSE is measured the same way (inputs of the full-precision
model on the first calibration sequences) and its token-mean NLL on held-out wiki windows; then
:func:`landscape.studies.misalignment.misalignment` gives Spearman(layer MSE, NLL) over all candidates, inside
(``||d|| <= R``) and outside R, with bootstrap intervals over candidates. Saved results are loaded one at a
time; quantized models this script computes (RTN/GPTQ at the extra formats) are saved beside the tables'
results and reused on a rerun.

R(w0) comes from :func:`landscape.engine.basin.basin_statistics` (``landscape radius``; figure 4's store
holds it) on the same layers: pass its median as ``--radius``.

Besides all candidates, the correlations are printed for two subsets of them: without the random roundings
(the methods only), and the post-training methods only (without QAFT, whose NLL also carries what fine-tuning
on the calibration text gains). ``--from-store STUDY.h5`` re-analyses a finished study's candidates (another
``--radius``, the subsets) without loading the model; ``--out`` is then optional.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from analyses.session import corpus_of, load_model_of, model_options
from landscape.cli.errors import script_main
from landscape.data import calibration_set, heldout_set
from landscape.outputs import check_output_path
from landscape.quant import gptq, parse_format, rtn
from landscape.quant.result import read_result_metadata
from landscape.studies.candidates import CandidateTable, measure_candidates, method_name, random_roundings
from landscape.studies.misalignment import Misalignment, misalignment
from landscape.weights import Base

TABLE_METHODS = ("rtn", "gptq", "gptq-noact", "gptq+lorc", "qaft")


def saved_candidates(results: Path, methods: tuple[str, ...]) -> dict[str, Path]:
    """label -> path stem of every saved result of ``methods`` under ``results`` (QAFT: seed 0 only)."""
    out = {}
    for js in sorted(results.glob("*.json")):
        meta = read_result_metadata(js)
        method = method_name(meta["method"], meta["settings"])
        if method not in methods or (method == "qaft" and meta["settings"].get("seed") != 0):
            continue
        lr = f" lr{meta['settings']['lr']:g}" if method == "qaft" else ""  # QAFT at several learning rates
        out[f"{method} {meta['format']}{lr}"] = js.with_suffix("")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(p)
    p.add_argument("--results",
                   help="the quantization tables' results/ folder (study.result_path); required unless "
                        "--from-store")
    p.add_argument("--radius", type=float, required=True, help="R(w0), median over directions, weight units")
    p.add_argument("--out", help="new HDF5 store for the study (required unless --from-store)")
    p.add_argument("--from-store",
                   help="re-analyse the candidates of this finished study instead of measuring")
    p.add_argument("--methods", nargs="+", default=list(TABLE_METHODS), help="saved results to include")
    p.add_argument("--rtn-formats", nargs="+", default=["int8", "int6", "int5"])
    p.add_argument("--gptq-formats", nargs="+", default=["int6", "int5"])
    p.add_argument("--rounding-formats", nargs="+", default=["int8", "int6", "int5", "int4"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.5, 1.0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--eval-segments", type=int, default=8)
    p.add_argument("--mse-sequences", type=int, default=8)
    args = p.parse_args(argv)
    # Everything that can be wrong is checked before the model loads.
    if not args.radius > 0:
        p.error(f"--radius must be R(w0) > 0, got {args.radius}")
    if args.from_store is None and (args.out is None or args.results is None):
        p.error("--out (a new store for the study) and --results are required unless --from-store "
                "re-analyses a finished study")
    bad = sorted(set(args.methods) - set(TABLE_METHODS))
    if bad:
        p.error(f"--methods {bad}: choose from {list(TABLE_METHODS)}")
    for f in (*args.rtn_formats, *args.gptq_formats, *args.rounding_formats):
        parse_format(f)
    out = check_output_path(args.out) if args.out is not None else None
    if out is not None and out.exists():
        p.error(f"--out {out} exists: the study writes a new store (remove it or choose another path)")
    if args.from_store is not None:
        try:
            table = Misalignment.from_store(args.from_store).candidates
        except (OSError, ValueError) as err:  # missing, unreadable or not a misalignment study
            p.error(f"--from-store {args.from_store}: {err}")
        report(table, args.radius, out)
        return
    specs = random_roundings(args.rounding_formats, args.seeds, args.fractions)

    lm = load_model_of(args)
    tok, ctx = lm.tokenizer, lm.info.context_length
    calib = calibration_set(tok, 128, args.calib_seq_len, 0, corpus_of(args), context_length=ctx)
    results = Path(args.results) / f"calib-{calib.content_hash}"
    results.mkdir(parents=True, exist_ok=True)
    for method, formats in (("rtn", args.rtn_formats), ("gptq", args.gptq_formats)):
        for fmt in (parse_format(f).name for f in formats):
            stem = results / f"{method}-{fmt}"
            if not stem.with_name(stem.name + ".json").exists():
                t0 = time.time()
                result = rtn(lm.base, fmt) if method == "rtn" else gptq(lm.base, calib, fmt)
                result.save(stem, overwrite=True)  # no .json: at most a killed save's tensors, replaced
                print(f"{method} {fmt}: {time.time() - t0:.0f} s, saved to {stem}", flush=True)
    candidates = {**saved_candidates(results, tuple(args.methods)), **specs}
    held = heldout_set(tok, args.eval_seq_len, corpus_of(args), args.eval_segments, context_length=ctx)
    table = measure_candidates(Base(lm.model, lm.info.name), candidates, held,
                               mse_data=calib.subset(range(args.mse_sequences)), batch_size=4)
    report(table, args.radius, out)


def report(table: CandidateTable, radius: float, out: Path | None) -> None:
    """Print the study of all candidates (with their rows) and of the subsets; store the first at ``out``."""
    study = misalignment(table, radius, bins=4)
    if out is not None:
        study.to_store(out)
    print(study.markdown())
    methods = np.array(table.methods)
    for name, keep in (("without the random roundings", methods != "stochastic-rounding"),
                       ("post-training methods only (no random roundings, no QAFT)",
                        ~np.isin(methods, ["stochastic-rounding", "qaft"]))):
        print(f"\n## {name}\n")
        print(misalignment(table.subset(keep), radius, bins=4).markdown(include_candidates=False))
    conv, mse = table.provenance["nll_convention"], table.provenance.get("mse_data", {})
    print(f"\nNLL: {conv['reduction']} over {conv['n_segments']} x {conv['seq_len']} held-out "
          f"{conv['corpus']} tokens (stride {conv['stride']}, {conv['n_tokens']:,} scored), {conv['unit']}; "
          f"layer MSE: {mse.get('n_segments', '?')} calibration sequences of {mse.get('seq_len', '?')} "
          f"tokens, full-precision inputs" + (f"; store: {out}" if out else ""))


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.misalignment_basin"))
