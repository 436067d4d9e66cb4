"""The bad-input matrix: every public entry point (library and CLI) refuses bad input with an error that names
the bad value and what is accepted, before any work starts, and leaves no file behind.

Each row of :data:`MATRIX` is one (bad input, entry point) pair. The test runs it on a fresh tiny GPT-2
(hidden 32, so every linear has 32 or 64 input columns) and checks, independently of the code under test:

* the error type, and that its message matches every pattern in ``says`` (the bad value, then what is
  accepted);
* no work: no forward pass of any model (a pre-hook on the model and on every quantizable layer), and for the
  rows marked ``before_load`` no model loaded at all;
* nothing left behind: the output directory holds exactly the same files, byte for byte, as before the call.

CLI rows run ``landscape.cli.main`` in-process; a non-zero exit (argparse's or the command's) becomes a
:class:`CLIError` whose message is the captured stderr.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import VOCAB, random_tokens, tiny_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

import landscape.data
import landscape.models
import landscape.studies.quant_table
from landscape import cli
from landscape.curvature import Curvature, CurvatureError, DirectionMismatchError
from landscape.data import (
    DataError,
    TokenSet,
    calibration_set,
    heldout_set,
    segments_from_stream,
    token_set_from_tensor,
)
from landscape.engine.basin import (
    BasinStatistics,
    RadiusSearch,
    basin_radius,
    basin_statistics,
    radial_profile,
)
from landscape.engine.directions import (
    Direction,
    DirectionError,
    DirectionSpec,
    displacement_direction,
    random_direction,
    user_direction,
)
from landscape.engine.perturb import ScanResult, scan
from landscape.engine.sweep import Execution
from landscape.models import ModelNotFoundError, load_model
from landscape.objectives import nll
from landscape.outputs import OutputPathError
from landscape.quant import (
    FinetuneSettings,
    FormatError,
    QuantFormat,
    QuantResult,
    ResultFileError,
    ResultMismatchError,
    gptq,
    lorc,
    parse_format,
    qaft,
    rtn,
)
from landscape.quant.result import metadata_sha256, tensors_sha256
from landscape.refmodel import train_tokenizer
from landscape.store import ResultStore, StoreError, StoreMismatchError, merge_stores, read_store
from landscape.studies.quant_table import Protocol, read_quant_table, run_quant_table
from landscape.weights import quantizable_layers, weight_matrix

FIRST_LAYER = "transformer.h.0.attn.c_attn"  # (out, in) = (96, 32) in the tiny GPT-2


class CLIError(Exception):
    """A CLI run that exited non-zero; the message is its stderr."""


def save_local_model(path: Path, seed: int) -> Path:
    """A tiny GPT-2 with a byte-level BPE tokenizer saved as a local model directory (safetensors)."""
    tokenizer = train_tokenizer(["the landscape around the pretrained weights"] * 20, 280)
    tiny_model("gpt2", vocab=len(tokenizer), seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ fixtures
@dataclass(frozen=True)
class Assets:
    """Files the rows read (never written by a row: rows that resume copy them into their own directory)."""

    model_dir: Path
    tokenizer: Any  # the local model's tokenizer
    other_result: Path  # RTN of another model (seed 1), same shapes
    own_result: Path  # RTN of the seed-0 model
    own_scan: Path  # finished scan store of the seed-0 model on random_tokens(2, 8)
    other_scan: Path  # the same scan of the seed-1 model
    truncated: Path  # the first half of own_scan's bytes
    corrupted: Path  # own_scan with every 7th byte flipped
    file_not_dir: Path  # a regular file, used as a parent directory


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    root = tmp_path_factory.mktemp("bad-input-assets")
    model_dir = save_local_model(root / "model", seed=0)
    own, other = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=1)
    rtn(other, "int4").save(root / "other-rtn")
    rtn(own, "int4").save(root / "own-rtn")
    grid, data = [0.0, 0.5], random_tokens(2, 8)
    scan(own, random_direction(own, 0), grid, data=data,
         execution=Execution(store=root / "own.h5", progress=False))
    scan(other, random_direction(other, 0), grid, data=data,
         execution=Execution(store=root / "other.h5", progress=False))
    raw = (root / "own.h5").read_bytes()
    (root / "truncated.h5").write_bytes(raw[: len(raw) // 2])
    (root / "corrupted.h5").write_bytes(bytes(b ^ 0xFF if i % 7 == 0 else b for i, b in enumerate(raw)))
    (root / "a-file").write_text("not a directory")
    return Assets(model_dir, AutoTokenizer.from_pretrained(model_dir), root / "other-rtn", root / "own-rtn",
                  root / "own.h5", root / "other.h5", root / "truncated.h5", root / "corrupted.h5",
                  root / "a-file")


@dataclass
class Context:
    """What a row's call receives: a fresh tiny GPT-2 (seed 0) and data, an empty output directory, the
    assets."""

    model: nn.Module
    data: TokenSet
    out: Path
    assets: Assets
    monkeypatch: pytest.MonkeyPatch

    def copy(self, asset: Path, name: str) -> Path:
        """Copy an asset into the output directory (a row's ``prepare``: the copy must come back
        unchanged)."""
        return Path(shutil.copy(asset, self.out / name))


@dataclass
class WorkLog:
    """Work done so far: forward passes of watched models, and models loaded by ``load_model``."""

    forwards: int = 0
    loads: int = 0

    def watch(self, model: nn.Module) -> None:
        for module in [model, *quantizable_layers(model).values()]:
            module.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.forwards += 1


@pytest.fixture
def work(monkeypatch) -> WorkLog:
    """Counts forward passes of the test model and of every model the CLI or the study loads."""
    log = WorkLog()
    real_load = landscape.models.load_model

    def counting_load(name, *args, **kwargs):
        loaded = real_load(name, *args, **kwargs)
        log.loads += 1
        log.watch(loaded.model)
        return loaded

    monkeypatch.setattr(landscape.models, "load_model", counting_load)
    monkeypatch.setattr(landscape.studies.quant_table, "load_model", counting_load)
    return log


def run_cli(argv: list[str]) -> None:
    """``landscape <argv>`` in-process; raises :class:`CLIError` with the captured stderr on a non-zero
    exit."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli.main(argv)
        except SystemExit as exit_:
            status = exit_.code
    if status != 0:
        raise CLIError(f"exit status {status}: {err.getvalue()}")


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (relative name) with the sha256 of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------- row helpers
def with_weight(model: nn.Module, value: float) -> nn.Module:
    """The model with entry (out 3, in 5) of the first layer's ``(out, in)`` weight set to ``value``."""
    with torch.no_grad():
        weight_matrix(quantizable_layers(model)[FIRST_LAYER])[3, 5] = value
    return model


def direction_with(c: Context, value: float) -> Direction:
    """The seed-0 random direction with one entry of the first layer replaced by ``value``."""
    u = random_direction(c.model, 0)
    tensors = {n: t.clone() for n, t in u.tensors.items()}
    tensors[FIRST_LAYER][3, 5] = value
    return Direction(tensors, u.spec)


def zero_direction(c: Context) -> Direction:
    u = random_direction(c.model, 0)
    return Direction({n: torch.zeros_like(t) for n, t in u.tensors.items()}, u.spec)


def edited_result(c: Context, name: str = "q", edit: Callable[[dict[str, Any]], None] | None = None,
                  tensors_from: Path | None = None, truncate_json: bool = False,
                  truncate_tensors: bool = False) -> Path:
    """A copy of the seed-0 RTN result in the output directory, its metadata or tensors altered, with the
    sha256 of both recomputed (as a consistent rewrite would: the rows test the checks behind the hashes;
    tests/test_result_integrity.py tests the hashes)."""
    src, stem = c.assets.own_result, c.out / name
    meta = json.loads(src.with_name(src.name + ".json").read_text())
    if edit:
        edit(meta)
    tensor_file = (tensors_from or src).with_name((tensors_from or src).name + ".safetensors")
    meta["sha256"] = {"tensors": tensors_sha256(load_file(tensor_file)), "metadata": metadata_sha256(meta)}
    text = json.dumps(meta)
    stem.with_name(name + ".json").write_text(text[:80] if truncate_json else text)
    tensors = tensor_file.read_bytes()
    stem.with_name(name + ".safetensors").write_bytes(tensors[:300] if truncate_tensors else tensors)
    return stem


def other_shape_result(c: Context) -> Path:
    """``q``: tensors of a hidden-16 model under the seed-0 model's metadata (right fingerprint, wrong
    shapes)."""
    rtn(tiny_model("gpt2", hidden=16), "int4").save(c.out / "small-rtn")
    return edited_result(c, "q", tensors_from=c.out / "small-rtn")


def short_corpus(c: Context, n_tokens: int) -> None:
    """Make every corpus a stream of ``n_tokens`` tokens (too little text for the request)."""
    c.monkeypatch.setattr(landscape.data, "token_stream", lambda *args: np.arange(n_tokens, dtype=np.int32))


def on_local_model(c: Context, command: str, *args: str) -> list[str]:
    """The argv of ``landscape <command> <the local model directory> <args>``."""
    return [command, str(c.assets.model_dir), *args]


ENGINE_DATA = ("--seq-len", "16", "--segments", "2", "--no-progress")
QUANT_DATA = ("--calib-sequences", "2", "--calib-seq-len", "16", "--no-progress")


# ------------------------------------------------------------------------------------------- the matrix
@dataclass(frozen=True)
class Row:
    """One bad input at one entry point, and how it must be refused."""

    case: str
    entry: str
    call: Callable[[Context], Any]
    error: type[Exception]
    says: tuple[str, ...]  # regexes the message must match: the bad value, then what is accepted
    before_load: bool = False  # CLI: refused before any model is loaded
    # makes the row's input files in ``out``, before the snapshot
    prepare: Callable[[Context], Any] | None = None


def oov_tokens() -> TokenSet:
    """Two segments whose last token id is one past the tiny models' vocabulary."""
    tokens = random_tokens(2, 8).tokens.clone()
    tokens[1, -1] = VOCAB
    return token_set_from_tensor(tokens, "oov")


MATRIX: tuple[Row, ...] = (
    # unknown model name
    Row("unknown model name", "load_model", lambda c: load_model("no-such-model"),
        ModelNotFoundError, ("'no-such-model'", "valid: .*ref-tiny")),
    Row("unknown model name", "run_quant_table",
        lambda c: run_quant_table(Protocol(model="no-such-model"), c.out), ModelNotFoundError,
        ("'no-such-model'", "valid: .*ref-tiny")),
    Row("unknown model name", "landscape eval", lambda c: run_cli(["eval", "no-such-model"]),
        CLIError, ("exit status 2", "unknown model 'no-such-model'", "valid: .*smollm2-135m")),
    # bits 1 and 9
    Row("bits 1", "parse_format", lambda c: parse_format("int1"), FormatError, ("got 1", r"2\.\.8")),
    Row("bits 9", "QuantFormat", lambda c: QuantFormat(bits=9), FormatError, ("got 9", r"2\.\.8")),
    Row("bits 9", "rtn", lambda c: rtn(c.model, "int9"), FormatError, ("got 9", r"2\.\.8")),
    Row("bits 1", "qaft", lambda c: qaft(c.model, c.data, "int1", FinetuneSettings(steps=1, batch_size=2),
                                         progress=False),
        FormatError, ("got 1", r"2\.\.8")),
    Row("bits 9", "Protocol", lambda c: Protocol(formats=("int4", "int9")), FormatError,
        ("got 9", r"2\.\.8")),
    Row("bits 1", "landscape quantize",
        lambda c: run_cli(on_local_model(c, "quantize", "--method", "gptq", "--format", "int1", "--out",
                                         str(c.out / "q"))),
        CLIError, ("exit status 2", "got 1", r"2\.\.8"), before_load=True),
    Row("bits 9", "landscape eval --rtn", lambda c: run_cli(on_local_model(c, "eval", "--rtn", "int9")),
        CLIError, ("exit status 2", "got 9", r"2\.\.8"), before_load=True),
    # unknown format string
    Row("unknown format", "parse_format", lambda c: parse_format("fp4"),
        FormatError, ("unknown format 'fp4'", "accepted: int<b>")),
    Row("unknown format", "gptq", lambda c: gptq(c.model, c.data, "nf4", progress=False),
        FormatError, ("unknown format 'nf4'", "accepted: int<b>")),
    Row("unknown format", "landscape quantize",
        lambda c: run_cli(on_local_model(c, "quantize", "--method", "rtn", "--format", "fp4", "--out",
                                         str(c.out / "q"))),
        CLIError, ("exit status 2", "unknown format 'fp4'", "accepted: int<b>"), before_load=True),
    # group size not dividing the columns
    Row("group 24 does not divide 32 columns", "rtn", lambda c: rtn(c.model, "int4-g24"),
        FormatError, ("group size 24", "in_features=32", r"group sizes that do: \[16, 32\]")),
    Row("group 24 does not divide 32 columns", "qaft",
        lambda c: qaft(c.model, c.data, "int4-g24", FinetuneSettings(steps=1, batch_size=2), progress=False),
        FormatError, ("group size 24", "in_features=32", r"group sizes that do: \[16, 32\]")),
    Row("MX block 24 does not divide 32 columns", "gptq",
        lambda c: gptq(c.model, c.data, "mxint4-24", progress=False), FormatError,
        ("group size 24", "in_features=32", r"group sizes that do: \[16, 32\]")),
    Row("group 24 does not divide 32 columns", "landscape quantize",
        lambda c: run_cli(on_local_model(c, "quantize", "--method", "gptq", "--format", "int4-g24", "--out",
                                         str(c.out / "q"),
                                *QUANT_DATA)),
        CLIError, ("exit status 2", "group size 24", "in_features=32", r"\[16, 32\]")),
    # empty or too-short text
    Row("empty token tensor", "token_set_from_tensor",
        lambda c: token_set_from_tensor(torch.empty(0, 16, dtype=torch.long)),
        DataError, (r"got shape \(0, 16\)", r"n_segments >= 1, seq_len >= 2")),
    Row("one-token segments", "TokenSet",
        lambda c: TokenSet(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.bool), "x", "x",
                           1, 1, "x"),
        DataError, (r"got shape \(3, 1\)", r"n_segments >= 1, seq_len >= 2")),
    Row("text shorter than one segment", "segments_from_stream",
        lambda c: segments_from_stream(np.arange(5), 16), DataError, ("5 tokens", "seq_len=16")),
    Row("empty text", "heldout_set", lambda c: heldout_set(c.assets.tokenizer, 16),
        DataError, ("0 tokens", "seq_len=16"), prepare=lambda c: short_corpus(c, 0)),
    Row("too little text for the calibration budget", "calibration_set",
        lambda c: calibration_set(c.assets.tokenizer, 8, 16),
        DataError, ("40 tokens = 2 disjoint segments of 16", "the 8 calibration sequences"),
        prepare=lambda c: short_corpus(c, 40)),
    Row("one-token calibration sequences", "landscape quantize",
        lambda c: run_cli(on_local_model(c, "quantize", "--method", "rtn", "--format", "int4", "--out",
                                         str(c.out / "q"),
                                "--calib-seq-len", "1")),
        CLIError, ("exit status 2", "got 1", "seq_len must be an integer >= 2")),
    # NaN / Inf in weights
    Row("NaN weight", "rtn", lambda c: rtn(with_weight(c.model, float("nan")), "int4"),
        ValueError, (FIRST_LAYER, "NaN or Inf", r"\[3, 5\]")),
    Row("Inf weight", "qaft", lambda c: qaft(with_weight(c.model, float("inf")), c.data, "int4",
                                             FinetuneSettings(steps=1, batch_size=2), progress=False),
        ValueError, (FIRST_LAYER, "NaN or Inf", r"\[3, 5\]")),
    Row("Inf weight", "scan",
        lambda c: scan(with_weight(c.model, float("inf")), random_direction(tiny_model(), 0), [0.0, 1.0],
                       data=c.data, execution=Execution(store=c.out / "s.h5", progress=False)),
        DirectionError, (FIRST_LAYER, "NaN or Inf weights", r"\[3, 5\]", "must be finite")),
    Row("NaN weight", "basin_statistics",
        lambda c: basin_statistics(with_weight(c.model, float("nan")), [DirectionSpec("random", seed=0)],
                                   data=c.data, execution=Execution(store=c.out / "r.h5", progress=False)),
        DirectionError, (FIRST_LAYER, "NaN or Inf weights", "must be finite")),
    Row("NaN weight", "Curvature.spectrum",
        lambda c: Curvature(with_weight(c.model, float("nan")), c.data,
                            progress=False).spectrum(k=1, k_bottom=0),
        CurvatureError, (FIRST_LAYER, "NaN or Inf", r"\[3, 5\]", "must be finite")),
    # NaN / Inf in calibration data
    Row("NaN calibration tokens", "token_set_from_tensor",
        lambda c: token_set_from_tensor(torch.full((2, 8), float("nan"))),
        DataError, ("dtype torch.float32 holding NaN or Inf", "integer token ids")),
    Row("Inf calibration tokens", "gptq",
        lambda c: gptq(c.model, TokenSet(torch.full((2, 8), float("inf")), torch.ones(2, 8, dtype=torch.bool),
                                         "x", "x", 8, 8, "x"), "int4", progress=False),
        DataError, ("dtype torch.float32 holding NaN or Inf", "integer token ids")),
    # token ids outside the model's vocabulary (text tokenized for another model)
    Row("token id = vocab size", "scan",
        lambda c: scan(c.model, random_direction(c.model, 0), [0.0, 1.0], data=oov_tokens(),
                       execution=Execution(store=c.out / "s.h5", progress=False)), ValueError,
        ("NLLObjective data", f"0..{VOCAB - 1}", f"got [0-9]+..{VOCAB}", "another model")),
    Row("token id = vocab size", "basin_statistics",
        lambda c: basin_statistics(c.model, [DirectionSpec("random", seed=0)], data=oov_tokens(),
                                   execution=Execution(store=c.out / "r.h5", progress=False)),
        ValueError, (f"0..{VOCAB - 1}", f"got [0-9]+..{VOCAB}")),
    Row("token id = vocab size", "Curvature.spectrum",
        lambda c: Curvature(c.model, oov_tokens(), progress=False).spectrum(k=1, k_bottom=0),
        CurvatureError, (f"0..{VOCAB - 1}", f"got [0-9]+..{VOCAB}")),
    Row("token id = vocab size", "nll", lambda c: nll(c.model, oov_tokens()),
        ValueError, (f"0..{VOCAB - 1}", f"got [0-9]+..{VOCAB}")),
    # NaN / Inf in directions
    Row("NaN direction", "user_direction",
        lambda c: user_direction(c.model, direction_with(c, float("nan")).tensors),
        DirectionError, (FIRST_LAYER, "NaN or Inf entries")),
    Row("Inf direction", "scan",
        lambda c: scan(c.model, direction_with(c, float("inf")), [1.0], data=c.data,
                       execution=Execution(store=c.out / "s.h5", progress=False)), DirectionError,
        (FIRST_LAYER, "NaN or Inf entries")),
    Row("NaN direction", "basin_radius",
        lambda c: basin_radius(c.model, direction_with(c, float("nan")), data=c.data), DirectionError,
        ("norm nan", "finite and nonzero")),
    Row("NaN direction", "Curvature.rayleigh_quotient",
        lambda c: Curvature(c.model, c.data).rayleigh_quotient(direction_with(c, float("nan")).tensors),
        DirectionMismatchError, (FIRST_LAYER, "non-finite")),
    # zero direction
    Row("zero direction", "scan",
        lambda c: scan(c.model, zero_direction(c), [1.0], data=c.data,
                       execution=Execution(store=c.out / "s.h5", progress=False)), DirectionError,
        ("norm 0.0", "finite and nonzero")),
    Row("zero direction", "basin_radius", lambda c: basin_radius(c.model, zero_direction(c), data=c.data),
        DirectionError, ("norm 0.0", "finite and nonzero")),
    Row("zero direction", "Curvature.rayleigh_quotient",
        lambda c: Curvature(c.model, c.data).rayleigh_quotient(zero_direction(c).tensors),
        DirectionMismatchError, ("zero everywhere", "undefined")),
    # negative radius or threshold
    Row("negative threshold", "RadiusSearch", lambda c: RadiusSearch(threshold=-0.1),
        ValueError, ("got -0.1", "finite number > 0")),
    Row("NaN threshold", "RadiusSearch", lambda c: RadiusSearch(threshold=float("nan")),
        ValueError, ("got nan", "finite number > 0")),
    Row("negative radius", "radial_profile",
        lambda c: radial_profile(c.model, random_direction(c.model, 0), [-1.0, 1.0], data=c.data),
        ValueError, (r"got \[-1.0, 1.0\]", "finite numbers >= 0")),
    Row("negative radius", "basin_statistics",
        lambda c: basin_statistics(c.model, [random_direction(c.model, 0)], data=c.data,
                                   profile_radii=[-0.5, 1.0],
                                   execution=Execution(store=c.out / "r.h5", progress=False)),
        ValueError, (r"got \[-0.5, 1.0\]", "finite numbers >= 0")),
    Row("negative threshold", "landscape radius",
        lambda c: run_cli(on_local_model(c, "radius", "--threshold", "-0.1", "--out", str(c.out / "r.h5"),
                                         *ENGINE_DATA)),
        CLIError, ("exit status 2", "got -0.1", "finite number > 0"), before_load=True),
    Row("negative radius", "landscape radius --profile",
        lambda c: run_cli(on_local_model(c, "radius", "--profile", "-0.1:0.2:3", "--out", str(c.out / "r.h5"),
                                         *ENGINE_DATA)),
        CLIError, ("exit status 2", r"got \[-0.1, 0.05, 0.2\]", "must be >= 0"), before_load=True),
    # a store from another model or data set
    Row("store from another model", "scan(resume=True)",
        lambda c: scan(c.model, random_direction(c.model, 0), [0.0, 0.5], data=c.data,
                       execution=Execution(store=c.out / "s.h5", resume=True, progress=False)),
        StoreMismatchError, ("model_fingerprint: store has", "this run has"),
        prepare=lambda c: c.copy(c.assets.other_scan, "s.h5")),
    Row("store from another data set", "scan(resume=True)",
        lambda c: scan(c.model, random_direction(c.model, 0), [0.0, 0.5], data=random_tokens(2, 8, seed=5),
                       execution=Execution(store=c.out / "s.h5", resume=True, progress=False)),
        StoreMismatchError, ("data.data_hash: store has", "this run has"),
        prepare=lambda c: c.copy(c.assets.own_scan, "s.h5")),
    Row("store from another model", "merge_stores",
        lambda c: merge_stores(c.out / "merged.h5", [c.assets.own_scan, c.assets.other_scan]),
        StoreMismatchError, ("cannot merge .*other.h5", "model_fingerprint")),
    Row("store from another model", "landscape scan --resume",
        lambda c: run_cli(on_local_model(c, "scan", "--grid", "0:0.5:2", "--resume", "--out",
                                         str(c.out / "s.h5"),
                                *ENGINE_DATA)),
        CLIError, ("exit status 2", "model_fingerprint: store has", "this run has"),
        prepare=lambda c: c.copy(c.assets.other_scan, "s.h5")),
    # truncated or corrupted HDF5
    Row("truncated HDF5", "read_store", lambda c: read_store(c.assets.truncated),
        StoreError, ("truncated.h5", "not a readable HDF5 store", "truncated file")),
    Row("corrupted HDF5", "ScanResult.from_store", lambda c: ScanResult.from_store(c.assets.corrupted),
        StoreError, ("corrupted.h5", "not a readable HDF5 store")),
    Row("truncated HDF5", "BasinStatistics.from_store",
        lambda c: BasinStatistics.from_store(c.assets.truncated), StoreError,
        ("truncated.h5", "not a readable HDF5 store")),
    Row("corrupted HDF5", "read_quant_table", lambda c: read_quant_table(c.assets.corrupted),
        StoreError, ("corrupted.h5", "not a readable HDF5 store")),
    Row("store of another kind", "read_quant_table", lambda c: read_quant_table(c.assets.own_scan),
        ValueError, ("holds a 'scan' run", "not a quant table")),
    Row("truncated unfinished store", "scan(resume=True)",
        lambda c: scan(c.model, random_direction(c.model, 0), [0.0, 0.5], data=c.data,
                       execution=Execution(store=c.out / "s.h5", resume=True, progress=False)),
        StoreError, ("s.h5.partial", "not a readable HDF5 store"),
        prepare=lambda c: c.copy(c.assets.truncated, "s.h5.partial")),
    Row("truncated HDF5", "landscape merge",
        lambda c: run_cli(["merge", str(c.out / "m.h5"), str(c.assets.own_scan), str(c.assets.truncated)]),
        CLIError, ("exit status 2", "truncated.h5", "not a readable HDF5 store")),
    # a quantized model whose metadata does not match its base
    Row("quantized model of another base", "QuantResult.load",
        lambda c: QuantResult.load(c.assets.other_result,
                                   base_fingerprint=QuantResult.load(c.assets.own_result).base_fingerprint),
        ResultMismatchError, ("computed on base", "fingerprint [0-9a-f]{16}", "not on this model")),
    Row("quantized model of another base", "displacement_direction",
        lambda c: displacement_direction(c.model, c.assets.other_result),
        DirectionError, ("computed on base", "not on this model")),
    Row("metadata fingerprint altered", "displacement_direction",
        lambda c: displacement_direction(c.model, c.out / "q"),
        DirectionError, ("fingerprint 0000000000000000", "not on this model"),
        prepare=lambda c: edited_result(c, edit=lambda meta: meta.update(base_fingerprint="0" * 16))),
    Row("metadata lists other layers", "QuantResult.load", lambda c: QuantResult.load(c.out / "q"),
        ResultMismatchError, ("q.safetensors do not match the layers listed in q.json",),
        prepare=lambda c: edited_result(c, edit=lambda meta: meta.update(layers=meta["layers"][:-1]))),
    Row("tensors of another shape", "displacement_direction",
        lambda c: displacement_direction(c.model, c.out / "q"), DirectionError,
        (r"shape \(48, 16\)", FIRST_LAYER, r"\(96, 32\)"), prepare=other_shape_result),
    Row("truncated metadata", "QuantResult.load", lambda c: QuantResult.load(c.out / "q"),
        ResultFileError, ("q.json", "not valid JSON"),
        prepare=lambda c: edited_result(c, truncate_json=True)),
    Row("truncated tensors", "QuantResult.load", lambda c: QuantResult.load(c.out / "q"),
        ResultFileError, ("q.safetensors", "not a readable safetensors file"),
        prepare=lambda c: edited_result(c, truncate_tensors=True)),
    Row("base of a LoRC correction from another model", "lorc",
        lambda c: lorc(c.model, QuantResult.load(c.assets.other_result), rank=2),
        ValueError, ("fingerprint", "this model")),
    Row("quantized model of another base", "landscape scan --kind displacement",
        lambda c: run_cli(on_local_model(c, "scan", "--kind", "displacement", "--quantized",
                                         str(c.assets.other_result),
                                "--grid", "0:1:2", "--out", str(c.out / "s.h5"), *ENGINE_DATA)),
        CLIError, ("exit status 2", "computed on base", "not on this model")),
    Row("quantized model of another base", "landscape radius --quantized",
        lambda c: run_cli(on_local_model(c, "radius", "--directions", "1", "--quantized",
                                         str(c.assets.other_result),
                                "--out", str(c.out / "r.h5"), *ENGINE_DATA)),
        CLIError, ("exit status 2", "computed on base", "not on this model")),
    # unwritable output directory (a regular file where a directory should be: refused even for root)
    Row("unwritable output", "scan",
        lambda c: scan(c.model, random_direction(c.model, 0), [0.0], data=c.data,
                       execution=Execution(store=c.assets.file_not_dir / "s.h5", progress=False)),
        OutputPathError, ("a-file is a file, not a directory", "writable directory")),
    Row("unwritable output", "basin_statistics",
        lambda c: basin_statistics(c.model, [random_direction(c.model, 0)], data=c.data,
                                   execution=Execution(store=c.assets.file_not_dir / "sub" / "r.h5",
                                                       progress=False)),
        OutputPathError, ("a-file is a file, not a directory", "writable directory")),
    Row("unwritable output", "ResultStore.create",
        lambda c: ResultStore.create(c.assets.file_not_dir / "x.h5", {}, {"v": ((), "f8")}, (2,)),
        OutputPathError, ("a-file is a file, not a directory", "writable directory")),
    Row("unwritable output", "QuantResult.save",
        lambda c: rtn(c.model, "int4").save(c.assets.file_not_dir / "q"), OutputPathError,
        ("a-file is a file, not a directory", "writable directory")),
    Row("unwritable output", "run_quant_table",
        lambda c: run_quant_table(Protocol(model=str(c.assets.model_dir)), c.assets.file_not_dir / "study"),
        OutputPathError, ("a-file is a file, not a directory", "writable directory")),
    Row("output path is a directory", "scan",
        lambda c: scan(c.model, random_direction(c.model, 0), [0.0], data=c.data,
                       execution=Execution(store=c.out, progress=False)), OutputPathError,
        ("is a directory", "file path inside it")),
    Row("unwritable output", "landscape quantize",
        lambda c: run_cli(on_local_model(c, "quantize", "--method", "rtn", "--format", "int4", "--out",
                                str(c.assets.file_not_dir / "q"), *QUANT_DATA)),
        CLIError, ("exit status 2", "a-file is a file, not a directory"), before_load=True),
    Row("unwritable output", "landscape scan",
        lambda c: run_cli(on_local_model(c, "scan", "--grid", "0:1:2", "--out",
                                         str(c.assets.file_not_dir / "s.h5"),
                                *ENGINE_DATA)),
        CLIError, ("exit status 2", "a-file is a file, not a directory"), before_load=True),
    Row("unwritable output", "landscape radius",
        lambda c: run_cli(on_local_model(c, "radius", "--out", str(c.assets.file_not_dir / "r.h5"),
                                         *ENGINE_DATA)),
        CLIError, ("exit status 2", "a-file is a file, not a directory"), before_load=True),
)


@pytest.mark.parametrize("row", MATRIX, ids=[f"{r.case} @ {r.entry}" for r in MATRIX])
def test_bad_input_is_refused_clearly_before_any_work_leaving_no_file(row, assets, work, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    context = Context(tiny_model("gpt2"), random_tokens(2, 8), out, assets, monkeypatch)
    if row.prepare:
        row.prepare(context)
    work.watch(context.model)
    before = snapshot(out)
    with pytest.raises(row.error) as raised:
        row.call(context)
    message = str(raised.value)
    for pattern in row.says:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    assert work.forwards == 0, f"{work.forwards} forward passes ran before the error"
    if row.before_load:
        assert work.loads == 0, "a model was loaded before the error"
    after = snapshot(out)
    assert after == before, f"files left behind or changed: {sorted(set(after) ^ set(before)) or 'contents'}"
