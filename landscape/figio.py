"""Writing Plotly figures: offline HTML (plotly.js once per folder) and optional PNG.

* HTML uses ``include_plotlyjs="directory"``: one shared ``plotly.min.js`` beside the pages, never a CDN
  (a CDN page is blank offline), and a fixed ``div_id`` so reruns are byte-identical.
* PNG needs kaleido 1.x and a Chrome/Chromium binary (Debian's ``chromium``); when either is missing
  the PNG is skipped and :func:`write_figure` says so instead of failing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

CHROME_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def chrome_path() -> str | None:
    """A Chrome/Chromium binary for static export, or None."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).exists():
        return env
    for name in CHROME_CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


def png_export_available() -> tuple[bool, str]:
    """Whether PNGs can be written here, and why not if they cannot."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False, "kaleido is not installed (pip install 'landscape[figures]')"
    if chrome_path() is None:
        return False, "no Chrome/Chromium binary (apt-get install chromium)"
    return True, ""


def write_figure(fig: go.Figure, out_dir: str | os.PathLike, stem: str, png: bool = True,
                 width: int = 1100, height: int = 650) -> dict[str, Path | str]:
    """Write ``<stem>.html`` (and ``<stem>.png`` when possible) into ``out_dir``.

    Returns the written paths, and under ``"png_skipped"`` the reason a PNG was not written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html = out / f"{stem}.html"
    tmp = html.with_name(html.name + ".tmp")
    pio.write_html(fig, str(tmp), include_plotlyjs="directory", full_html=True, div_id=f"fig-{stem}",
                   auto_open=False, config={"displaylogo": False})
    os.replace(tmp, html)
    written: dict[str, Path | str] = {"html": html}
    if png:
        ok, why = png_export_available()
        if ok:
            os.environ.setdefault("BROWSER_PATH", chrome_path() or "")
            fig.write_image(str(out / f"{stem}.png"), width=width, height=height, scale=1)
            written["png"] = out / f"{stem}.png"
        else:
            written["png_skipped"] = why
    return written
