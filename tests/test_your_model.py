"""Your model end to end: the whole figure pipeline (tiny profile) on Llama-, OPT- and GPT-2-architecture
models saved with ``save_pretrained`` (safetensors and a tokenizer) into a directory, as a user's own
checkpoint would be, the Llama one in bfloat16 and the GPT-2 one also in float64.

Each run must write the seven pages naming that model, stores that record the dtype the run computed in, and
quantized models in that dtype; the float64 run's NLLs must equal the float32 run's within float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import offline_pipeline, tiny_model
from safetensors import safe_open

from analyses import run_all
from landscape import data as D
from landscape.refmodel import train_tokenizer
from landscape.store import read_store

pytestmark = pytest.mark.filterwarnings("ignore::landscape.curvature.ConvergenceWarning")
RUNS = {"llama": ("bfloat16",), "opt": ("float32",), "gpt2": ("float32", "float64")}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(arch, dtype) -> (model directory, figure folder) after ``run_all --tiny --model DIR --dtype D``."""
    root = tmp_path_factory.mktemp("your-model")
    out: dict[tuple[str, str], tuple[Path, Path]] = {}
    with offline_pipeline(root):
        tokenizer = train_tokenizer(D.wiki_documents("train")[:300], vocab_size=512)
        for arch, dtypes in RUNS.items():
            directory = root / f"my-{arch}"
            tiny_model(arch, vocab=len(tokenizer)).save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            for dtype in dtypes:
                figures = root / f"figures-{arch}-{dtype}"
                argv = ["--tiny", "--model", str(directory), "--out", str(figures), "--dtype", dtype,
                        "--no-png", "--no-progress"]
                assert run_all.main(argv) == 0
                out[arch, dtype] = directory, figures
    return out


def stores(figures: Path) -> dict[str, object]:
    """Every HDF5 store under ``<figures>/data`` by its path relative to it."""
    data = figures / "data"
    return {str(p.relative_to(data)): read_store(p) for p in sorted(data.rglob("*.h5"))}


@pytest.mark.parametrize("arch, dtype", [(a, d) for a, ds in RUNS.items() for d in ds])
def test_seven_pages_each_naming_the_model(pipelines, arch, dtype):
    directory, figures = pipelines[arch, dtype]
    pages = sorted(figures.glob("fig*.html"))
    assert [p.name[:4] for p in pages] == [f"fig{i}" for i in range(1, 8)]
    for page in pages:
        text = page.read_text(encoding="utf-8").replace("\\u002f", "/")  # plotly escapes "/" in its JSON
        assert str(directory) in text, f"{page.name} does not name {directory}"
    index = (figures / "index.html").read_text(encoding="utf-8")
    assert all(f'href="{page.name}"' in index for page in pages) and str(directory) in index
    # the unquantized row is named by the dtype the model ran in
    short = {"float32": "fp32", "bfloat16": "bf16", "float64": "fp64"}[dtype]
    first = pages[0].read_text(encoding="utf-8")
    assert f"{short} (w0)" in first and (dtype == "float32" or "fp32 (w0)" not in first)


@pytest.mark.parametrize("arch, dtype", [(a, d) for a, ds in RUNS.items() for d in ds])
def test_every_store_and_quantized_model_records_the_runs_dtype(pipelines, arch, dtype):
    directory, figures = pipelines[arch, dtype]
    found = stores(figures)
    assert len(found) >= 10
    for name, store in found.items():
        prov = store.provenance
        recorded = prov["dtype"] if "dtype" in prov else prov["model_info"]["dtype"]
        assert recorded == dtype, name
        assert prov.get("model", prov.get("model_info", {}).get("name")) == str(directory), name
    runs = [json.loads(line) for line in (figures / "data" / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 1 and runs[0]["dtype"] == dtype and runs[0]["model"] == str(directory)
    assert len(runs[0]["steps"]) >= 10 and all(step["peak_rss_gb"] > 0 for step in runs[0]["steps"])
    saved = sorted((figures / "data").rglob("*.safetensors"))
    assert saved
    for path in saved:
        with safe_open(str(path), "pt") as f:
            dtypes = {str(f.get_tensor(key).dtype) for key in f.keys()}
        # a LoRC result also stores its low-rank factors (fp16 by default)
        assert f"torch.{dtype}" in dtypes and dtypes <= {f"torch.{dtype}", "torch.float16"}, (path, dtypes)


def table_nll(figures: Path) -> dict[str, float]:
    """Held-out wiki NLL of every quantization-table row (label -> nats/token)."""
    values = {}
    for store in stores(figures).values():
        if store.provenance.get("kind") == "quant_table":
            values |= {str(label): float(v) for label, v in zip(store.arrays["variants/label"],
                                                                 store.arrays["nll/wiki"])}
    return values


def test_float64_nlls_equal_the_float32_ones_within_float32_rounding(pipelines):
    nll32, nll64 = table_nll(pipelines["gpt2", "float32"][1]), table_nll(pipelines["gpt2", "float64"][1])
    assert nll32.keys() == nll64.keys()
    # w0 (the unquantized row) and round-to-nearest: the same weights in both runs (RTN's grid is exact in
    # both), so only the forward pass's rounding differs
    exact = [label for label in nll32 if label == "fp32" or label.startswith("rtn ")]
    assert len(exact) >= 4, sorted(nll32)
    for label in exact:
        assert nll32[label] != nll64[label]
        assert abs(nll32[label] - nll64[label]) < 1e-5 * nll64[label], label
