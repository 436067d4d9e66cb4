"""Saved results are identified and checked by content (issue #20 items 2 and 6, RELIABILITY.md items 3, 4,
7 and 10): a changed tensor or metadata field is refused on load; weights changed and re-hashed by hand are
refused by the grid of their format on the base (never reported as ``rtn int4``); old results without hashes
still load; a displacement scan resumed after its result was replaced is refused; results with the same
file name in different folders get distinct rows; and no command or library call overwrites a saved result
without ``overwrite``.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_tokens, tiny_model
from safetensors.torch import load_file, save_file
from test_bad_inputs import save_local_model

import landscape.cli.compare  # noqa: F401  (registers the commands)
import landscape.cli.quantize  # noqa: F401
import landscape.cli.scan  # noqa: F401
import landscape.engine.perturb
from landscape import cli
from landscape.engine.basin import BasinStatistics
from landscape.engine.directions import (
    DirectionError,
    displacement_direction,
    random_direction,
    regenerate,
)
from landscape.engine.perturb import ScanResult
from landscape.models import load_model
from landscape.quant import FinetuneSettings, fp_finetune, gptq, lorc, qaft, rtn
from landscape.quant.formats import make_grid
from landscape.quant.result import (
    QuantResult,
    ResultExistsError,
    ResultIntegrityError,
    ResultOffGridError,
    distinct_names,
    metadata_sha256,
    read_result_metadata,
    saved_tensors_sha256,
    tensors_sha256,
)
from landscape.store import partial_path, read_store
from landscape.studies.compare import ComparisonSettings, compare_displacements
from landscape.studies.comparison import Comparison, ComparisonError
from landscape.weights import layer_weights

LAYER = "transformer.h.0.attn.c_proj"  # a (32, 32) layer of the tiny GPT-2


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``landscape <argv>`` in-process: (exit status, stdout, stderr); Ctrl-C is status 130."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(argv)
        except KeyboardInterrupt:
            status = 130
    return status, out.getvalue(), err.getvalue()


def files(stem: Path) -> tuple[Path, Path]:
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def rewrite(stem: Path, edit_tensors=None, edit_meta=None, rehash: bool = True) -> None:
    """Change a saved result in place; ``rehash``: recompute both sha256 by hand, as a consistent rewrite
    (an attacker, or a bug that rewrites the pair) would."""
    st, js = files(stem)
    tensors, meta = load_file(str(st)), json.loads(js.read_text())
    if edit_tensors:
        edit_tensors(tensors)
        save_file(tensors, str(st))
    if edit_meta:
        edit_meta(meta)
    if rehash:
        meta["sha256"] = {"tensors": tensors_sha256(tensors), "metadata": metadata_sha256(meta)}
    js.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", hidden=32)


@pytest.fixture(scope="module")
def calib():
    return random_tokens(8, 16, seed=1)


# ----------------------------------------------------------------------------------- identity by content
def test_a_saved_result_records_the_sha256_of_its_tensors_and_metadata(model, tmp_path):
    result = rtn(model, "int4")
    stem = result.save(tmp_path / "q")
    meta = read_result_metadata(stem)
    assert meta["version"] == 2
    assert meta["sha256"]["tensors"] == result.tensors_sha256() == saved_tensors_sha256(stem)
    assert meta["sha256"]["metadata"] == metadata_sha256(meta)
    # the identity depends on the content, not on the order of the layers or the file's layout
    reordered = dict(reversed(list(result.weights.items())))
    assert tensors_sha256(reordered) == result.tensors_sha256()
    changed = {**result.weights, LAYER: result.weights[LAYER].clone()}
    changed[LAYER][0, 0] = -changed[LAYER][0, 0]
    assert tensors_sha256(changed) != result.tensors_sha256()
    assert tensors_sha256({n: w.double() for n, w in result.weights.items()}) != result.tensors_sha256()


def test_a_flipped_tensor_value_is_refused_on_load(model, tmp_path):
    stem = rtn(model, "int4").save(tmp_path / "R")
    assert QuantResult.load(stem).label == "rtn int4"
    st, _ = files(stem)
    raw = bytearray(st.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    raw[8 + header + 4 * 100 + 3] ^= 0x80  # the sign bit of the 101st float32 of the data: still a number
    st.write_bytes(bytes(raw))
    message = (r"the tensors of .*R\.safetensors do not match the sha256 recorded in R\.json.*changed after "
               r"it was saved; re-run the command that made it")
    with pytest.raises(ResultIntegrityError, match=message):
        QuantResult.load(stem)
    with pytest.raises(ResultIntegrityError, match=message):
        displacement_direction(model, stem, streamed=True)  # verified a layer at a time, too
    with pytest.raises(ResultIntegrityError, match=message):
        displacement_direction(model, stem)


EDITS = [{"format": "int8"}, {"method": "gptq"}, {"format": "int8", "method": "gptq"},
         {"base_fingerprint": "0" * 16}]


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_json_is_refused(model, tmp_path, edit):
    stem = rtn(model, "int4").save(tmp_path / "R")
    rewrite(stem, edit_meta=lambda meta: meta.update(edit), rehash=False)
    message = r"R\.json does not match the sha256 of its metadata recorded in it.*edited after it was saved"
    for read in (read_result_metadata, QuantResult.load, lambda s: displacement_direction(model, s)):
        with pytest.raises(ResultIntegrityError, match=message):
            read(stem)
    # a version-2 JSON whose hashes were removed is refused too (only version 1 has none)
    rewrite(stem, edit_meta=lambda meta: meta.pop("sha256"), rehash=False)
    with pytest.raises(ResultIntegrityError, match="lacks the sha256 of its tensors and metadata"):
        QuantResult.load(stem)


def test_a_result_saved_before_hashes_still_loads_and_is_identified_by_its_tensors(model, tmp_path):
    original = rtn(model, "int4")
    stem = original.save(tmp_path / "old")
    rewrite(stem, edit_meta=lambda meta: (meta.pop("sha256"), meta.update(version=1)), rehash=False)
    assert "sha256" not in json.loads(files(stem)[1].read_text())
    loaded = QuantResult.load(stem, base=model)
    assert loaded.label == "rtn int4"
    assert all(torch.equal(loaded.weights[n], w) for n, w in original.weights.items())
    assert saved_tensors_sha256(stem) == original.tensors_sha256()
    for streamed in (False, True):
        assert displacement_direction(model, stem, streamed=streamed).spec.content_hash == \
            original.tensors_sha256()


# ------------------------------------------------------------------------------------ its own grid
def test_weights_changed_and_rehashed_are_refused_by_their_grid_never_reported_as_rtn_int4(model, tmp_path):
    stem = rtn(model, "int4").save(tmp_path / "R")

    def shifted(tensors):
        tensors[LAYER] = tensors[LAYER] + 0.123

    rewrite(stem, edit_tensors=shifted)  # both hashes recomputed: consistent, so the hashes cannot tell
    tampered = QuantResult.load(stem)  # no base: nothing to check the weights against
    assert torch.equal(tampered.weights[LAYER], load_file(str(files(stem)[0]))[LAYER])
    message = rf"{LAYER}.* off the int4 grid of its base's w0"
    with pytest.raises(ResultOffGridError, match=message):
        QuantResult.load(stem, base=model)
    with pytest.raises(ResultOffGridError, match=message):
        tampered.check_grid(model)
    with pytest.raises(ComparisonError, match=message):
        compare_displacements(model, {"rtn int4": tampered}, random_tokens(2, 16, seed=3),
                              settings=ComparisonSettings(curvature_t=()), progress=False)
    for streamed in (False, True):
        with pytest.raises(DirectionError, match=message):
            displacement_direction(model, stem, streamed=streamed)
    # the untouched layers are on the grid: the check sees the one layer that moved
    good = {n: w for n, w in tampered.weights.items() if n != LAYER}
    QuantResult(good, tampered.format, "rtn", base_fingerprint=tampered.base_fingerprint).check_grid(model)


def test_results_on_their_grid_load_with_their_base_and_grid_less_results_are_exempt(model, calib, tmp_path):
    settings = FinetuneSettings(lr=3e-2, steps=3, batch_size=2, learned_scales=True)
    learned = qaft(model, calib, "int4-g16", settings, progress=False)
    w0 = layer_weights(model, list(learned.weights))
    plain_grid = {n: make_grid(w0[n], "int4-g16") for n in learned.weights}
    assert not all(plain_grid[n].contains(w) for n, w in learned.weights.items())  # learned scales moved
    results = {
        "gptq": gptq(model, calib, "int3", progress=False),
        "rtn-bf16": rtn(tiny_model("gpt2", torch.bfloat16, hidden=32), "int4-g16"),
        "qaft-learned": learned,
        "control": fp_finetune(model, calib, "int4", FinetuneSettings(lr=1e-2, steps=2, batch_size=2),
                               progress=False),
        "lorc": lorc(model, rtn(model, "int3"), rank=2, progress=False),
    }
    for name, result in results.items():
        stem = result.save(tmp_path / name)
        base = tiny_model("gpt2", torch.bfloat16, hidden=32) if name == "rtn-bf16" else model
        loaded = QuantResult.load(stem, base=base)
        assert loaded.tensors_sha256() == result.tensors_sha256(), name
    # without its learned scales the QAFT result is off the grid of w0: the learned lattice is what is checked
    stem = tmp_path / "qaft-learned"
    rewrite(stem, edit_meta=lambda meta: meta["extra"].pop("learned_scales"))
    with pytest.raises(ResultOffGridError, match="off the int4-g16 grid"):
        QuantResult.load(stem, base=model)


# ------------------------------------------------------------------- a direction records the hash
def test_a_displacement_spec_records_the_result_hash_and_refuses_a_replaced_result(model, tmp_path):
    first = rtn(model, "int4")
    stem = first.save(tmp_path / "R")
    d = displacement_direction(model, stem)
    assert d.spec.content_hash == first.tensors_sha256()
    assert d.spec.to_dict()["content_hash"] == first.tensors_sha256()
    assert displacement_direction(model, first).spec.content_hash == first.tensors_sha256()
    assert "content_hash" not in random_direction(model, 0).spec.to_dict()  # older specs read as before
    assert torch.equal(regenerate(model, d.spec)[LAYER], d[LAYER])
    streamed = displacement_direction(model, stem, streamed=True)
    rtn(model, "int3").save(stem, overwrite=True)  # another result at the same path
    with pytest.raises(DirectionError, match="is not the one direction .* was made from"):
        regenerate(model, d.spec)
    with pytest.raises(DirectionError, match="replaced or modified while a direction read it"):
        streamed[LAYER]


def test_a_resumed_displacement_scan_refuses_a_replaced_result(tmp_path, monkeypatch):
    model_dir = str(save_local_model(tmp_path / "model", seed=0))
    result = tmp_path / "q" / "x"
    quantize = ["quantize", model_dir, "--method", "rtn", "--calib-sequences", "4", "--calib-seq-len", "16",
                "--out", str(result), "--no-progress"]
    assert run_cli([*quantize, "--format", "int4"])[0] == 0
    out = tmp_path / "s.h5"
    argv = ["scan", model_dir, "--kind", "displacement", "--quantized", str(result), "--grid", "0:1:6",
            "--seq-len", "16", "--segments", "2", "--out", str(out), "--no-progress"]
    real_nll, calls = landscape.engine.perturb.nll, []

    def stopping_after(n):
        def nll(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise KeyboardInterrupt  # Ctrl-C between two points
            return real_nll(*args, **kwargs)
        return nll

    monkeypatch.setattr(landscape.engine.perturb, "nll", stopping_after(2))
    assert run_cli(argv)[0] == 130
    assert int(read_store(partial_path(out)).done.sum()) == 2
    calls.clear()
    monkeypatch.setattr(landscape.engine.perturb, "nll", stopping_after(1))
    assert run_cli([*argv, "--resume"])[0] == 130  # the same result: resumed, one more point
    assert int(read_store(partial_path(out)).done.sum()) == 3
    monkeypatch.setattr(landscape.engine.perturb, "nll", real_nll)

    status, _, err = run_cli([*quantize, "--format", "int3"])  # refused: a result is there
    assert status == 2 and "--overwrite" in err
    assert run_cli([*quantize, "--format", "int3", "--overwrite"])[0] == 0
    status, _, err = run_cli([*argv, "--resume"])
    assert status == 2 and "written for a different run" in err and "directions" in err
    assert int(read_store(partial_path(out)).done.sum()) == 3  # nothing mixed in
    # with the result it was started on, the run completes
    assert run_cli([*quantize, "--format", "int4", "--overwrite"])[0] == 0
    assert run_cli([*argv, "--resume"])[0] == 0
    scanned = ScanResult.from_store(out)
    assert scanned.done.all() and scanned.directions[0].content_hash == saved_tensors_sha256(result)


# --------------------------------------------------------------------------------------- unique labels
def test_distinct_names_are_the_shortest_distinguishing_trailing_paths(tmp_path):
    assert distinct_names(["runs/a/g4", "runs/b/g4", "q/x"]) == ["a/g4", "b/g4", "x"]
    assert distinct_names(["x/a/g4", "y/a/g4.json"]) == ["x/a/g4", "y/a/g4"]
    assert distinct_names(["only"]) == ["only"]
    with pytest.raises(ValueError, match="given twice"):
        distinct_names(["runs/a/g4", "runs/a/g4.safetensors"])


def test_results_with_the_same_file_name_in_two_folders_give_two_rows_in_compare_and_radius(tmp_path):
    model_dir = str(save_local_model(tmp_path / "model", seed=0))
    lm = load_model(model_dir)
    vocab = len(lm.tokenizer)
    stems = [gptq(lm.model, random_tokens(8, 16, seed=s, vocab=vocab), "int4", progress=False
                  ).save(tmp_path / "runs" / folder / "g4") for s, folder in ((1, "a"), (2, "b"))]
    norms = [displacement_direction(lm.model, s).norm() for s in stems]
    assert norms[0] != norms[1]
    data = ["--seq-len", "16", "--segments", "2", "--no-progress"]
    status, printed, err = run_cli(["compare", model_dir, *map(str, stems), "--path", "0:1:2",
                                    "--no-curvature", "--out", str(tmp_path / "c.h5"), *data])
    assert status == 0, err
    assert "| gptq int4 (a/g4) |" in printed and "| gptq int4 (b/g4) |" in printed
    stored = Comparison.from_store(tmp_path / "c.h5")
    assert stored.labels == ["gptq int4 (a/g4)", "gptq int4 (b/g4)"]
    assert [stored.row(x).norm for x in stored.labels] == pytest.approx(norms, rel=1e-9)

    radius = ["radius", model_dir, "--directions", "1", "--threshold", "0.5", "--tolerance", "0.5",
              "--quantized", str(stems[0]), "--quantized", str(stems[1]), *data]
    status, printed, err = run_cli([*radius, "--out", str(tmp_path / "r.h5")])
    assert status == 0, err
    found = BasinStatistics.from_store(tmp_path / "r.h5").displacement_norms
    assert found == pytest.approx({"a/g4": norms[0], "b/g4": norms[1]}, rel=1e-9)
    assert "a/g4: ||w_q - w0||" in printed and "b/g4: ||w_q - w0||" in printed
    status, _, err = run_cli([*radius, "--quantized", f"{stems[0]}.json", "--out", str(tmp_path / "r2.h5")])
    assert status == 2 and "given twice" in err


# ------------------------------------------------------------------------------------ never overwrite
def test_save_refuses_an_existing_result_unless_overwrite(model, tmp_path):
    stem = rtn(model, "int4").save(tmp_path / "R")
    with pytest.raises(ResultExistsError, match=r"R\.json already exists.*--overwrite"):
        rtn(model, "int3").save(stem)
    assert QuantResult.load(stem).label == "rtn int4"
    files(stem)[1].unlink()  # only the tensors left (a save killed between its two files): still refused
    with pytest.raises(ResultExistsError, match=r"R\.safetensors already exists"):
        rtn(model, "int3").save(stem)
    assert rtn(model, "int3").save(stem, overwrite=True) == stem
    assert QuantResult.load(stem).label == "rtn int3"


def test_quantize_refuses_an_existing_result_before_any_work_and_replaces_it_with_overwrite(tmp_path,
                                                                                           monkeypatch):
    model_dir = str(save_local_model(tmp_path / "model", seed=0))
    out = tmp_path / "q" / "x"
    argv = ["quantize", model_dir, "--method", "rtn", "--calib-sequences", "4", "--calib-seq-len", "16",
            "--out", str(out), "--no-progress"]
    assert run_cli([*argv, "--format", "int4"])[0] == 0
    before = {p.name: p.read_bytes() for p in files(out)}
    loads = []
    real_load = landscape.cli.quantize.load
    monkeypatch.setattr(landscape.cli.quantize, "load", lambda args: loads.append(args) or real_load(args))
    for existing in ("both", "tensors only"):
        if existing == "tensors only":
            files(out)[1].unlink()
        status, _, err = run_cli([*argv, "--format", "int3"])
        assert status == 2 and loads == []  # refused before the model was loaded
        assert f"{out}.{'json' if existing == 'both' else 'safetensors'} already exists" in err
        assert "--overwrite" in err
    assert files(out)[0].read_bytes() == before["x.safetensors"]  # untouched
    assert run_cli([*argv, "--format", "int3", "--overwrite"])[0] == 0 and len(loads) == 1
    replaced = QuantResult.load(out)
    assert replaced.label == "rtn int3" and files(out)[0].read_bytes() != before["x.safetensors"]
    assert np.isfinite([float(w.abs().max()) for w in replaced.weights.values()]).all()
