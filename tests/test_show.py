"""``landscape show STORE``: the summary names the kind, the points done and every array; the page draws the
store's own numbers (a 1-D and a 2-D scan, a radius search, a spectrum, and a table for other kinds)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import saved_tiny_llama

from landscape.cli import main as cli_main
from landscape.models import load_model
from landscape.plots.stores import store_figure
from landscape.store import read_store
from landscape.studies.quant_table import Protocol, run_quant_table

pytestmark = pytest.mark.filterwarnings("ignore::landscape.curvature.ConvergenceWarning")
SMALL = ["--segments", "2", "--seq-len", "16", "--no-progress"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("show")
    model = saved_tiny_llama(root / "my-llama")
    runs = {"scan1": ["scan", str(model), "--kind", "filter", "--grid", "-1:1:5", *SMALL],
            "scan2": ["scan", str(model), "--kind", "filter", "--grid", "-1:1:3", "--kind2", "filter",
                      "--seed2", "1", "--grid2", "-1:1:3", *SMALL],
            "radius": ["radius", str(model), "--directions", "2", *SMALL],
            "spectrum": ["spectrum", str(model), "--k", "2", "--k-bottom", "1", "--lanczos-steps", "6",
                         "--trace-matvecs", "0", "--density-runs", "1", "--density-steps", "4", *SMALL]}
    paths = {}
    for name, argv in runs.items():
        paths[name] = root / f"{name}.h5"
        assert cli_main([*argv, "--out", str(paths[name])]) == 0, name
    protocol = Protocol(model=str(model), calib_sequences=4, calib_seq_len=16, eval_corpora=("wiki",),
                        eval_seq_len=16, eval_segments=2, formats=("int4",), methods=("rtn",))
    paths["table"] = run_quant_table(protocol, root / "table", progress=False, lm=load_model(str(model)))
    return paths


def test_the_summary_says_what_the_store_holds(stores, capsys):
    for name, path in stores.items():
        capsys.readouterr()
        assert cli_main(["show", str(path), "--no-html"]) == 0
        out = capsys.readouterr().out
        data = read_store(path)
        kind = data.provenance["kind"]
        assert out.startswith(f"{path.name}: {kind} store, {data.done.sum()} of {data.done.size} points done")
        for array in data.arrays:
            assert array in out, (name, array)
        assert "NLL      token-mean nats per scored token" in out, name
        assert not (path.parent / f"{path.stem}.h5.html").exists()


def test_the_pages_draw_the_stores_numbers(stores, capsys):
    one = read_store(stores["scan1"])
    fig = store_figure(one)
    np.testing.assert_array_equal(fig.data[0].x, one.arrays["coords/axis0"])
    np.testing.assert_array_equal(fig.data[0].y, one.arrays["nll"])
    two = read_store(stores["scan2"])
    contour = store_figure(two).data[0]
    np.testing.assert_array_equal(np.asarray(contour.z), two.arrays["nll"])
    radius = read_store(stores["radius"])
    traces, r = {t.name: t for t in store_figure(radius).data}, radius.arrays["radius"]
    np.testing.assert_array_equal(traces["R(w0)"].y, r[np.isfinite(r)])
    if not np.isfinite(r).all():  # drawn at the largest radius its search evaluated
        searched = np.nanmax(radius.arrays["search_radius"], axis=1)[~np.isfinite(r)]
        np.testing.assert_array_equal(traces["no crossing up to this radius (R = inf)"].y, searched)
    for i in range(len(r)):
        evaluated = np.isfinite(radius.arrays["search_radius"][i])
        assert sorted(traces[f"direction {i}"].y) == sorted(radius.arrays["search_value"][i][evaluated])
    spectrum = read_store(stores["spectrum"])
    top = [t for t in store_figure(spectrum).data if t.name == "top eigenvalues"]
    stored = [a for k, a in spectrum.arrays.items() if k.endswith("top/eigenvalues")]
    assert len(top) == 1 and len(stored) == 1
    np.testing.assert_array_equal(top[0].y, stored[0])
    assert cli_main(["show", str(stores["radius"])]) == 0
    page = stores["radius"].with_name("radius.h5.html")
    assert page.exists() and (page.parent / "plotly.min.js").exists()
    assert "radius.h5: basin_radius" in page.read_text()
    assert cli_main(["show", str(stores["table"])]) == 0  # a quantization table: its convention is a sentence
    assert "quant_table.h5: quant_table" in stores["table"].with_name("quant_table.h5.html").read_text()
    table_page = store_figure(read_store(stores["table"]))
    assert [a.name for a in table_page.layout.annotations].count("caption") == 1  # one caption, no overlap


def test_a_file_that_is_not_a_store_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "notes.h5"
    bad.write_text("not hdf5")
    assert cli_main(["show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "notes.h5" in err
    assert not (tmp_path / "notes.h5.html").exists()
