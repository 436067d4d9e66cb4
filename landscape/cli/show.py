"""``landscape show STORE``: what a store holds, in words, and one interactive Plotly page of it."""

from __future__ import annotations

import argparse
import webbrowser
from pathlib import Path

from landscape.cli.common import Command
from landscape.figio import write_figure
from landscape.plots.stores import store_figure, store_summary
from landscape.store import read_store


def show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="an HDF5 store (finished, or a stopped run's .partial)")
    p.add_argument("--html", type=Path, default=None,
                   help="the page to write (default: <store>.html beside the store; plotly.js beside it)")
    p.add_argument("--no-html", action="store_true", help="print only; write no page")
    p.add_argument("--open", action="store_true", help="open the page in a browser")


def run_show(args: argparse.Namespace) -> int:
    data = read_store(args.store)  # a missing, damaged or busy store fails here, before any page
    print(store_summary(data, args.store.name))
    if args.no_html:
        return 0
    page = args.html or args.store.with_name(args.store.name.removesuffix(".partial") + ".html")
    written = write_figure(store_figure(data, args.store.name), page.parent, page.stem, png=False)
    print(f"page     {written['html']}")
    if args.open:
        webbrowser.open(Path(written["html"]).resolve().as_uri())
    return 0


COMMANDS = (Command("show", "what a store holds (kind, provenance, settings, arrays, done points) and an "
                            "interactive page of it", show_arguments, run_show),)
