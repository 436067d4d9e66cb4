"""Figure 3: local layer MSE against global NLL over many quantized candidates (the misalignment).

Candidates: the quantization tables' RTN, GPTQ, GPTQ + LoRC and QAFT results at the profile's formats,
plus dithered roundings onto the same grid, ``round(w0 / s + z + strength (u - 1/2))`` with seeded
``u ~ U[0, 1)`` (strength 1 is stochastic rounding, ``floor(w0 / s + z + u)``). Every candidate's layer
MSE is measured the same way (inputs of the full-precision model on the first calibration sequences)
and its NLL on the tables' in-domain evaluation windows.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import plotly.graph_objects as go

from analyses.plan import COSTS, Step, quant_table_steps, run_figure_script
from analyses.session import Session, calibration, eval_set, model_protocols, quantized_model_path
from landscape import plots
from landscape.cli.errors import script_main
from landscape.engine.sweep import Execution
from landscape.quant import parse_format
from landscape.store import read_store
from landscape.studies.candidates import dithered_roundings, measure_candidates
from landscape.weights import Base

FIGURE = "fig3_misalignment"
TITLE = "Layer MSE against NLL: the misalignment"


def table_candidates(session: Session) -> list[tuple[str, str, str]]:
    """``(label, method, format)`` of the quantization tables' results at the profile's misalignment
    formats."""
    model = session.profile.model
    out = []
    for fmt in (parse_format(f).name for f in session.profile.misalignment.formats):
        for protocol in model_protocols(session, model):
            if fmt in (parse_format(f).name for f in protocol.formats):
                out += [(f"{m} {fmt}", m, fmt) for m in protocol.methods if m in plots.QUANTIZED_METHODS]
    return out


def dithers(session: Session) -> dict:
    """The dithered roundings at the profile's misalignment formats, strengths and seeds."""
    settings = session.profile.misalignment
    return dithered_roundings([parse_format(f).name for f in settings.formats], settings.strengths,
                              settings.seeds)


def candidates(session: Session) -> dict:
    """label -> candidate: the table results (saved results, by path: they must exist), then the dithers."""
    model = session.profile.model
    saved = {label: str(quantized_model_path(session, model, method, fmt))
             for label, method, fmt in table_candidates(session)}
    return saved | dithers(session)


def store(session: Session) -> Path:
    model = session.profile.model
    return session.store_path(model, "misalignment", {
        "misalignment": asdict(session.profile.misalignment), "eval_segments": session.profile.eval_segments,
        "tables": [p.to_dict() for p in model_protocols(session, model)]})


def measure(session: Session) -> None:
    model = session.profile.model
    lm = session.model(model)
    mse_data = calibration(session, model).subset(range(session.profile.misalignment.mse_sequences))
    execution = Execution(store=store(session), resume=True, provenance={"model_info": lm.info.to_dict()},
                          progress=session.progress)
    measure_candidates(Base(lm.model, model), candidates(session), eval_set(session, model),
                       mse_data=mse_data, batch_size=4, execution=execution)


def steps(session: Session) -> list[Step]:
    p, model = session.profile, session.profile.model
    per_candidate = (COSTS.forward(model, p.eval_segments * p.eval_seq_len)
                     + COSTS.layer_mse(model, p.misalignment.mse_sequences * p.calib_seq_len))
    n = len(table_candidates(session)) + len(dithers(session))
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
    sys.exit(script_main(main, "analyses.fig3_misalignment"))
