"""Regenerate the seven headline figures: plan, measure what the stores lack, plot, write figures/index.html.

``make figures`` runs ``python -m analyses.run_all --quick --out figures`` (SmolLM2-135M, quick protocol) and
``make figures-full`` the full protocol. The plan with estimated times is printed first; one progress
bar (in estimated seconds) covers every measurement; a rerun after completion finds every store and only
rebuilds the pages (unchanged pages are not rewritten).
"""

from __future__ import annotations

import html
import sys

from analyses import (
    fig1_nll_vs_bits,
    fig2_pareto,
    fig3_misalignment,
    fig4_radial_profile,
    fig5_slices,
    fig6_curvature,
    fig7_model_size,
)
from analyses.plan import execute, figure_cluster, plan_text, record_run, run_step_shard, summary_text
from analyses.session import Session, parse_args, publish, session_from_args
from landscape.cli.errors import script_main
from landscape.data import corpus_label
from landscape.plots import caption_of

FIGURES = (fig1_nll_vs_bits, fig2_pareto, fig3_misalignment, fig4_radial_profile, fig5_slices, fig6_curvature,
           fig7_model_size)


def index_page(session: Session, entries: list[tuple[str, str, str, str]]) -> str:
    """``figures/index.html``: per figure (stem, title, reading, caption) a link, its PNG if there is one,
    the generated reading and the caption. Deterministic: the same stores give the same bytes."""
    p = session.profile
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        "<title>landscape: the headline figures</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45;color:#222}"
        "img{max-width:100%;border:1px solid #ddd}.caption{font-size:0.85em;color:#555}"
        "h2{margin-top:2em}</style>", "</head>", "<body>",
        "<h1>Why low-precision PTQ fails where QAFT succeeds: the headline figures</h1>",
        f"<p>Protocol <b>{html.escape(p.name)}</b> on <b>{html.escape(p.model)}</b>: "
        f"{p.calib_sequences} calibration sequences × {p.calib_seq_len} tokens shared by every method, "
        f"held-out NLL on {' and '.join(html.escape(corpus_label(c)) for c in p.eval_corpora)} "
        f"({p.eval_segments} × {p.eval_seq_len} tokens). "
        "Every number below is read from the HDF5 stores in <code>data/</code>; each page works offline "
        "(plotly.min.js beside it).</p>",
    ]
    for number, (stem, title, reading, caption) in enumerate(entries, start=1):
        parts.append(f'<h2><a href="{stem}.html">{number}. {html.escape(title)}</a></h2>')
        if (session.out / f"{stem}.png").exists():
            parts.append(f'<a href="{stem}.html"><img src="{stem}.png" alt="{html.escape(title)}"></a>')
        parts.append(f"<p>{html.escape(reading)}</p>")
        parts.append(f'<p class="caption">{html.escape(caption).replace(chr(10), "<br>")}</p>')
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(__doc__, argv)
    session = session_from_args(args)
    steps = [step for module in FIGURES for step in module.steps(session)]
    if args.step:  # one job of a sweep step (--executor)
        return run_step_shard(steps, session, args.step, args.shard)
    cluster = figure_cluster(args)
    print(plan_text(steps, session), flush=True)
    if args.plan:
        return 0
    reports = execute(steps, session, cluster, argv)
    entries = []
    for module in FIGURES:
        fig = module.figure(session)
        print(publish(fig, session, module.FIGURE), flush=True)
        entries.append((module.FIGURE, module.TITLE, module.reading(session), caption_of(fig)))
    index = session.out / "index.html"
    page = index_page(session, entries)
    if not index.exists() or index.read_text(encoding="utf-8") != page:
        index.write_text(page, encoding="utf-8")
    print(f"{index}: {len(entries)} figures", flush=True)
    if reports:
        where = record_run(session, reports)
        print(f"\nWhat this run measured (also in {where}):\n{summary_text(reports)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(script_main(main, "analyses.run_all"))
