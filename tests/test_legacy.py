"""Stores and a saved result written by the code of commit 2917599 (``tests/fixtures/legacy``, made on
ref-tiny by ``make_legacy.py`` there) read and give the same numbers today, and the seven figure pages
rebuilt from those stores are byte-identical to the pages that code wrote.

``expected.json`` holds what the old code read: a sha256 of every array of every store, its done mask and
provenance, the outputs of the typed readers (floats as ``float.hex``), the saved result's weights and
metadata, and a sha256 of every page of ``run_all --tiny``. ``changed.json`` lists the pages and readings
changed on purpose since (with the commit and why, and the new sha256 or text): every other page must still
be the old code's, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from landscape.curvature import read_curvature
from landscape.engine.basin import BasinStatistics
from landscape.engine.perturb import ScanResult
from landscape.quant.result import QuantResult
from landscape.store import read_store
from landscape.studies.comparison import Comparison
from landscape.studies.misalignment import Misalignment
from landscape.studies.predict import PredictorEvaluation
from landscape.studies.quant_table import read_quant_table

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())
CHANGED = json.loads((LEGACY / "changed.json").read_text())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def floats(x) -> list[str]:
    return [float(v).hex() for v in np.asarray(x, dtype=np.float64).ravel()]


def digest(path: Path) -> dict:
    """What ``make_legacy.py`` recorded of a store: every array's dtype, shape and bytes, done mask,
    provenance."""
    data = read_store(path)
    arrays = {}
    for name, a in sorted(data.arrays.items()):
        a = np.asarray(a)
        raw = "\x1f".join(map(str, a.ravel().tolist())).encode() if a.dtype.kind in "UO" else a.tobytes()
        arrays[name] = [str(a.dtype), list(a.shape), sha(raw)]
    return {"kind": data.provenance.get("kind"), "arrays": arrays, "done": sha(data.done.tobytes()),
            "grid_shape": list(data.grid_shape), "point_arrays": list(data.point_arrays),
            "provenance": sha(json.dumps(data.provenance, sort_keys=True).encode())}


@pytest.mark.parametrize("name", sorted(EXPECTED["stores"]))
def test_every_legacy_store_reads_the_same_arrays(name):
    assert digest(LEGACY / name) == EXPECTED["stores"][name]


def reader_output(name: str, how: dict) -> dict:
    """What the typed reader of the store ``name`` gives, in the form ``make_legacy.py`` recorded it."""
    path = LEGACY / name
    kind = how["reader"]
    if kind == "quant_table":
        table = read_quant_table(path)
        return {"reader": kind, "markdown": table.markdown(),
                "nll": {r["label"]: {c: float(v).hex() for c, v in r["nll"].items()} for r in table.rows}}
    if kind == "basin":
        b = BasinStatistics.from_store(path)
        return {"reader": kind, "radii": floats(b.radii),
                "quantiles": {str(k): float(v).hex() for k, v in b.quantiles().items()},
                "displacement_norms": {k: float(v).hex() for k, v in b.displacement_norms.items()},
                "center_value": float(b.center_value).hex(), "weights_norm": float(b.weights_norm).hex()}
    if kind == "scan":
        s = ScanResult.from_store(path)
        return {"reader": kind, "nll": floats(s.values["nll"]), "grid": [floats(g) for g in s.grid],
                "directions": [d.to_dict() for d in s.directions]}
    if kind == "spectrum_report":
        return {"reader": kind, "text": read_curvature(path).markdown(paths=False)}
    if kind == "comparison":
        c = Comparison.from_store(path)
        return {"reader": kind, "markdown": c.markdown(per_layer=True),
                "norms": floats([r.norm for r in c.rows]), "curvature": [floats(r.curvature) for r in c.rows],
                "slope": [floats(r.slope) for r in c.rows], "cosines": floats(c.cosines)}
    if kind == "misalignment":
        return {"reader": kind, "markdown": Misalignment.from_store(path).markdown()}
    if kind == "predict":
        return {"reader": kind, "markdown": PredictorEvaluation.from_store(path).markdown()}
    raise AssertionError(f"unknown reader {kind!r}")


@pytest.mark.parametrize("name", sorted(EXPECTED["readers"]))
def test_every_legacy_store_gives_the_same_numbers_through_its_reader(name):
    how = EXPECTED["readers"][name]
    assert reader_output(name, how) == how


def test_a_legacy_saved_result_loads_with_the_same_weights_and_metadata():
    want = EXPECTED["result"]
    result = QuantResult.load(LEGACY / want["path"], base_fingerprint=want["base_fingerprint"])
    assert result.label == want["label"]
    assert {n: sha(w.numpy().tobytes()) for n, w in result.weights.items()} == want["weights"]
    assert {n: float(v).hex() for n, v in result.layer_mse.items()} == want["layer_mse"]
    assert result.settings == want["settings"] and result.storage_bits() == want["storage_bits"]


def test_the_seven_pages_rebuilt_from_legacy_stores_are_byte_identical(tmp_path):
    """``run_all --tiny`` on a copy of the legacy stores measures nothing (every store exists: no model is
    loaded) and writes pages equal to the old code's, byte for byte, with the same readings."""
    from analyses import run_all
    from analyses.session import parse_args, session_from_args

    out = tmp_path / "figures"
    shutil.copytree(LEGACY / "figures" / "data", out / "data")
    argv = ["--tiny", "--model", "ref-tiny", "--out", str(out), "--no-png", "--no-progress"]
    assert run_all.main(argv) == 0
    assert set(CHANGED["pages"]) < set(EXPECTED["pages"])
    assert set(CHANGED["readings"]) < set(EXPECTED["readings"])
    pages = {**EXPECTED["pages"], **CHANGED["pages"]}
    assert {page: sha((out / page).read_bytes()) for page in pages} == pages
    session = session_from_args(parse_args("", argv))
    readings = {**EXPECTED["readings"], **CHANGED["readings"]}
    assert {m.FIGURE: m.reading(session) for m in run_all.FIGURES} == readings
    assert session._models == {}  # nothing was measured
