"""Figure 3: local layer MSE against global NLL over many quantized candidates (the misalignment).

Candidates: the quantization tables' RTN, GPTQ, GPTQ + LoRC and QAFT results at the profile's formats,
plus dithered roundings onto the same grid, ``round(w0 / s + z + strength (u - 1/2))`` with seeded
``u ~ U[0, 1)`` (strength 1 is stochastic rounding, ``floor(w0 / s + z + u)``). Every candidate's layer
MSE is measured the same way (inputs of the full-precision model on the first calibration sequences)
and its NLL on the tables' in-domain evaluation windows.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python analyses/fig3_misalignment.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import plotly.graph_objects as go
import torch

from analyses.common import (
    COSTS,
    Session,
    Step,
    calibration,
    eval_set,
    model_protocols,
    quant_table_steps,
    quantized_model_path,
    run_figure_script,
)
from landscape import plots
from landscape.quant import Grid, parse_format
from landscape.store import read_store

FIGURE = "fig3_misalignment"
TITLE = "Layer MSE against NLL: the misalignment"


@dataclass(frozen=True)
class Candidate:
    """One quantized model of the scatter: a quantization-table result, or a dithered rounding."""

    label: str
    method: str  # a table method (rtn, gptq, ...) or "dither"
    format: str
    seed: int = 0
    strength: float = float("nan")  # dither strength (NaN for table results)


def dithered_rounding(w0: torch.Tensor, grid: Grid, strength: float, generator: torch.Generator) -> torch.Tensor:
    """``w0`` rounded onto ``grid`` after a uniform dither of ``strength`` grid steps.

    Each entry becomes the lattice point ``round(w0 / s + z + strength (u - 1/2))`` (clamped to the code
    range) with ``u ~ U[0, 1)`` drawn from ``generator`` (float32, then cast). ``strength = 1`` is
    stochastic rounding, ``floor(w0 / s + z + u)``: each entry goes up with probability equal to its
    fractional part, so the expectation is ``w0`` inside the range; ``strength = 0`` is round-to-nearest.
    """
    u = torch.rand(tuple(w0.shape), generator=generator, dtype=torch.float32).to(w0)
    step = grid.scale.repeat_interleave(grid.group_size, dim=1).to(w0)  # (out, in): one grid step per entry
    return grid.round(w0 + strength * (u - 0.5) * step)


def dither_generator(seed: int, fmt: str, layer: str) -> torch.Generator:
    """A generator seeded by ``(seed, format, layer name)``: a layer's dither does not depend on the others."""
    digest = hashlib.sha256(f"{seed}/{parse_format(fmt).name}/{layer}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def candidates(session: Session) -> list[Candidate]:
    """The table results at the profile's misalignment formats, then the dithered roundings."""
    settings = session.profile.misalignment
    out = []
    for fmt in (parse_format(f).name for f in settings.formats):
        for protocol in model_protocols(session, session.profile.model):
            if fmt in (parse_format(f).name for f in protocol.formats):
                out += [Candidate(f"{m} {fmt}", m, fmt) for m in protocol.methods if m in plots.QUANTIZED_METHODS]
    for fmt in (parse_format(f).name for f in settings.formats):
        for strength in settings.strengths:
            out += [Candidate(f"dither σ={strength:g} {fmt} seed {seed}", "dither", fmt, seed, float(strength))
                    for seed in settings.seeds]
    return out


def store(session: Session) -> Path:
    model = session.profile.model
    return session.store_path(model, "misalignment", {
        "misalignment": asdict(session.profile.misalignment), "eval_segments": session.profile.eval_segments,
        "tables": [p.to_dict() for p in model_protocols(session, model)]})


def measure(session: Session) -> None:
    from landscape.engine.sweep import progress_bar
    from landscape.objectives import NLLConvention, layer_mse, nll
    from landscape.quant import make_grid
    from landscape.quant.result import QuantResult
    from landscape.stats import nll_interval
    from landscape.store import finish_run, start_run
    from landscape.weights import layer_weights, swapped_weights, weights_fingerprint

    model = session.profile.model
    lm, chosen = session.model(model), candidates(session)
    held = eval_set(session, model)
    mse_data = calibration(session, model).subset(range(session.profile.misalignment.mse_sequences))
    w0 = layer_weights(lm.model)  # (out, in) of every quantized layer
    fingerprint = weights_fingerprint(lm.model)

    def weights_of(c: Candidate) -> dict[str, torch.Tensor]:
        if c.method != "dither":
            return QuantResult.load(quantized_model_path(session, model, c.method, c.format), fingerprint).weights
        return {n: dithered_rounding(w, make_grid(w, c.format, n), c.strength, dither_generator(c.seed, c.format, n))
                for n, w in w0.items()}

    provenance = {
        "kind": "misalignment", "model": model, "model_info": lm.info.to_dict(), "model_fingerprint": fingerprint,
        "data": held.provenance(), "nll_convention": NLLConvention.for_data(held, model).to_dict(),
        "layer_mse": {"n_layers": len(w0), "n_segments": mse_data.n_segments, "seq_len": mse_data.seq_len,
                      "data_hash": mse_data.content_hash, "inputs": "full-precision model (reference)",
                      "unit": "squared activations, mean over tokens and outputs, summed over layers"},
        "strengths": list(session.profile.misalignment.strengths), "candidates": [asdict(c) for c in chosen],
        "dither": "round(w0/s + z + strength (u - 1/2)), u ~ U[0,1) float32 per layer from sha256(seed/format/layer)",
    }
    n_seg = held.n_segments
    arrays = {"nll": ((), np.float64), "nll_low": ((), np.float64), "nll_high": ((), np.float64),
              "segment_nll_sum": ((n_seg,), np.float64), "segment_tokens": ((n_seg,), np.int64),
              "layer_mse_sum": ((), np.float64), "layer_mse": ((len(w0),), np.float64),
              "displacement_norm": ((), np.float64)}
    with start_run(store(session), provenance, arrays, (len(chosen),), resume=True) as record:
        if record.writable:
            record.write_table("candidates", {k: [getattr(c, k) for c in chosen] for k in asdict(chosen[0])})
            record.write_array("layers", list(w0))
        for i in progress_bar(np.flatnonzero(~record.done), session.progress, "misalignment candidates"):
            weights = weights_of(chosen[i])
            with swapped_weights(lm.model, weights):
                result = nll(lm.model, held, batch_size=4, model_name=model)
            mse = layer_mse(lm.model, mse_data, weights, inputs="reference", batch_size=4)
            interval = nll_interval(result)
            record.write_point(int(i), {
                "nll": result.value, "nll_low": interval.low, "nll_high": interval.high,
                "segment_nll_sum": result.segment_nll_sum, "segment_tokens": result.segment_tokens,
                "layer_mse_sum": sum(mse.values()), "layer_mse": [mse[n] for n in w0],
                "displacement_norm": float(torch.sqrt(sum((weights[n].double() - w.double()).pow(2).sum()
                                                          for n, w in w0.items())))})
        finish_run(record)


def steps(session: Session) -> list[Step]:
    p, model = session.profile, session.profile.model
    per_candidate = (COSTS.forward(model, p.eval_segments * p.eval_seq_len)
                     + COSTS.layer_mse(model, p.misalignment.mse_sequences * p.calib_seq_len))
    n = len(candidates(session))
    return [*quant_table_steps(session, model),
            Step(f"{model}: layer MSE and NLL of {n} candidates", store(session), n * per_candidate,
                 lambda: measure(session), model)]


def figure(session: Session) -> go.Figure:
    return plots.misalignment(read_store(store(session)))


def reading(session: Session) -> str:
    return plots.reading_misalignment(read_store(store(session)))


def main(argv: list[str] | None = None) -> int:
    return run_figure_script(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
