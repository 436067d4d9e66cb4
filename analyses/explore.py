"""Explore a figures folder's stores (a marimo notebook): pick a model, a format and a method, and see its
quantization-table rows, the scans and radius searches of that model, and any store's page, linked.

    pip install -e '.[explore]'
    marimo edit analyses/explore.py -- --folder figures      # or: marimo run ...
    python analyses/explore.py --folder figures               # as a plain script (what the test does)

Every number shown is read from the HDF5 stores (``landscape.plots.stores`` draws each page).
"""

import marimo

__generated_with = "0.25.2"
app = marimo.App(width="full")


@app.cell
def _():
    from pathlib import Path

    import marimo as mo

    from landscape.plots.stores import store_figure, store_summary
    from landscape.store import StoreError, read_store
    from landscape.studies.quant_table import quant_table_rows

    return Path, StoreError, mo, quant_table_rows, read_store, store_figure, store_summary


@app.cell
def _(Path, StoreError, mo, read_store):
    folder = Path(mo.cli_args().get("folder") or "figures")
    stores = {}
    for path in sorted(folder.rglob("*.h5")):
        try:
            stores[path] = read_store(path)
        except StoreError:  # unfinished or damaged: the summary of a readable one says why
            continue
    models = sorted({str(d.provenance.get("model") or d.provenance.get("protocol", {}).get("model"))
                     for d in stores.values()})
    return folder, models, stores


@app.cell
def _(mo, models, quant_table_rows, stores):
    tables = {p: d for p, d in stores.items() if d.provenance.get("kind") == "quant_table"}
    rows = [dict(r, model=d.provenance["protocol"]["model"])
            for d in tables.values() for r in quant_table_rows(d)]
    formats = sorted({r["format"] for r in rows if r["format"]})
    methods = sorted({r["method"] for r in rows})
    model = mo.ui.dropdown(models, value=models[0] if models else None, label="model")
    fmt = mo.ui.dropdown(formats, value=formats[0] if formats else None, label="format")
    method = mo.ui.dropdown(["(all)", *methods], value="(all)", label="method")
    mo.hstack([model, fmt, method])
    return fmt, method, model, rows, tables


@app.cell
def _(fmt, method, mo, model, rows, tables):
    selected_rows = [
        {"label": r["label"], "NLL (in-domain)": next(iter(r["nll"].values())),
         "||w_q - w0||": r["displacement_norm"], "layer MSE": r["layer_mse_sum"],
         "bits/weight": r["bits_per_weight"]}
        for r in rows if r["model"] == model.value and r["format"] in (fmt.value, "")
        and (method.value == "(all)" or r["method"] in (method.value, "fp32"))]
    conventions = sorted({f"{p['eval_segments']} x {p['eval_seq_len']} held-out tokens per corpus"
                          for p in (d.provenance["protocol"] for d in tables.values())
                          if p.get("model") == model.value})
    mo.ui.table(selected_rows, format_mapping={"NLL (in-domain)": "{:.4f}", "||w_q - w0||": "{:.4g}",
                                               "layer MSE": "{:.4g}", "bits/weight": "{:.3f}"},
                label=f"quantization tables of {model.value} at {fmt.value} (NLL: token-mean nats per scored "
                      f"token, {'; '.join(conventions)})")
    return (selected_rows,)


@app.cell
def _(mo, model, stores):
    of_model = {p: d for p, d in stores.items()
                if str(d.provenance.get("model")) == model.value
                and d.provenance.get("kind") != "quant_table"}
    choices = {f"{p.parent.name}/{p.name} ({d.provenance.get('kind')})": str(p) for p, d in of_model.items()}
    store = mo.ui.dropdown(choices, value=next(iter(choices), None), label="store of this model")
    store
    return of_model, store


@app.cell
def _(Path, mo, of_model, store, store_figure, store_summary):
    shown = of_model.get(Path(store.value)) if store.value else None
    page = None if shown is None else store_figure(shown, Path(store.value).name)
    mo.vstack([mo.md(f"```\n{store_summary(shown, Path(store.value).name)}\n```"), mo.ui.plotly(page)]
              if shown is not None else [mo.md("Pick a store of this model.")])
    return page, shown


if __name__ == "__main__":
    app.run()
