"""The page's building blocks: escaped text, tables, sections, and images inlined as base64 PNG.

Plots are matplotlib Figures on the Agg canvas (no pyplot, no display, thread-safe); matplotlib is imported
only when a figure is drawn, so the command line starts without it.
"""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np
from PIL import Image

PLOT_DPI = 96
THUMB_PX = 160
COLORS = {"mlp": "#4c72b0", "xgb": "#55a868", "logreg": "#8172b3", "abmil": "#937860", "fused": "#c44e52"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1240px;
padding:1em 2em;color:#222}
.warn{color:#8a4b00}h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}
img.plot{max-width:100%;display:block;margin:.6em 0}img.crop{width:96px;height:96px;margin:2px}
.cards{display:flex;flex-wrap:wrap;gap:.6em}.card{margin:0;width:180px;font-size:.8em}
.missing{color:#8a6d3b;background:#fcf8e3;padding:.4em .8em;border-left:4px solid #f0ad4e}
.small{font-size:.8em;color:#666}nav a{margin-right:1em}
"""


def esc(x) -> str:
    return html.escape(str(x))


def figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no display, thread-safe)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def fig_img(fig, alt: str) -> str:
    """A figure as an inlined ``<img class="plot">``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI, facecolor="white")
    return f'<img class="plot" alt="{esc(alt)}" src="{png_uri(buf.getvalue())}">'


def thumb_img(rgb: np.ndarray, alt: str, px: int = THUMB_PX) -> str:
    """Pixels shrunk to at most ``px`` on the longest side, as an inlined ``<img class="thumb">``."""
    im = Image.fromarray(rgb)
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return f'<img class="thumb" alt="{esc(alt)}" src="{png_uri(buf.getvalue())}">'


def table(header: list[str], rows: list[list]) -> str:
    """An HTML table; floats with three decimals, NaN as ``-``."""
    def cell(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3f}"
        return esc(v)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def missing(what: str) -> str:
    """What a section cannot show, and why (every test of an incomplete run looks for "Not shown")."""
    return f'<p class="missing">Not shown: {esc(what)}</p>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def display_name(key: str) -> str:
    """``split/image_id`` as a reader sees it: ``img_0003.png (test)``."""
    split, image_id = key.split("/", 1)
    return f"{image_id} ({split})"


def draw_boxes(ax, rgb, boxes, colors=None, labels=None) -> None:
    """An image on ``ax`` with crop boxes: outlined, or filled with ``colors``; ``labels`` in their corners."""
    from matplotlib.patches import Rectangle
    ax.imshow(rgb)
    ax.set_axis_off()
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        color = colors[k] if colors is not None else "#00e5ff"
        fill = colors is not None
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=fill, facecolor=color,
                               alpha=0.45 if fill else 1.0, edgecolor="none" if fill else color,
                               linewidth=1.5))
        if fill:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))
        if labels is not None:
            ax.text(x0 + 2, y0 + 2, labels[k], color="black", fontsize=7, va="top",
                    bbox=dict(facecolor="white", alpha=0.7, pad=1, edgecolor="none"))
