"""``report()``: one self-contained HTML file with text, tables, figures and an interactive layer/head selector.

Everything is inlined: figures as base64 PNG ``<img>``, attention maps as base64 bytes drawn on a ``<canvas>``
by a few lines of plain JavaScript. The page loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnkit.io.atomic import atomic_write

__all__ = [
    "SCRIPT",
    "STYLE",
    "HeadMaps",
    "Section",
    "escape_html",
    "render_section",
    "report",
    "save_table",
    "script_json",
    "table_csv",
]

#: Characters that could end or change an inline ``<script>`` block, or a JavaScript string, as JSON escapes.
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def escape_html(value: Any) -> str:
    """``str(value)`` safe in HTML text and in quoted attribute values (``&``, ``<``, ``>``, ``"``, ``'``).

    The one escaping function for everything the report puts into HTML; labels such as ``"<!--"`` or
    ``"<script>"`` appear as written.
    """
    return html.escape(str(value), quote=True)


def script_json(value: Any) -> str:
    """``value`` as JSON that is safe inside an inline ``<script>`` element.

    ``<``, ``>`` and ``&`` are written as ``\\u003c``-style escapes, so no label can close the element
    (``</script>``) or switch the HTML parser into its comment-like "double escaped" state (``<!--`` then
    ``<script>``), which would swallow the rest of the page; U+2028/U+2029 are escaped for older JavaScript
    engines. ``JSON.parse`` of the element's text gives ``value`` back unchanged.
    """
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    return "".join(_SCRIPT_ESCAPES.get(c, c) for c in text)


@dataclass
class HeadMaps:
    """A layer x head set of attention maps for one example, browsed with the report's selector.

    Attributes:
        maps: ``(layers, H, Lq, Lk)`` probabilities (e.g. ``rec.stack()[:, b]``).
        query_tokens: ``Lq`` labels of the rows, optional.
        key_tokens: ``Lk`` labels of the columns, optional (default: the query labels when ``Lq == Lk``).
        layer_names: ``layers`` labels, optional.
    """

    maps: Tensor
    query_tokens: Sequence[str] | None = None
    key_tokens: Sequence[str] | None = None
    layer_names: Sequence[str] | None = None

    def check(self) -> None:
        """Raise ValueError when shapes and labels disagree."""
        if not isinstance(self.maps, Tensor) or self.maps.ndim != 4:
            raise ValueError(
                f"HeadMaps: maps must be a (layers, H, Lq, Lk) tensor, got {getattr(self.maps, 'shape', self.maps)!r}"
            )
        layers, _, lq, lk = self.maps.shape
        for name, labels, n in (
            ("query_tokens", self.query_tokens, lq),
            ("key_tokens", self.key_tokens, lk),
            ("layer_names", self.layer_names, layers),
        ):
            if labels is not None and len(labels) != n:
                raise ValueError(f"HeadMaps: {name} has {len(labels)} labels, maps need {n}")


@dataclass
class Section:
    """One part of a report.

    Attributes:
        title: heading.
        text: plain text (HTML-escaped; blank lines separate paragraphs).
        table: rows of cells (rendered with ``str``), optional; ``table_header`` labels its columns.
        figures: matplotlib figures or PNG bytes, inlined in order.
        head_maps: maps browsed with the interactive layer/head selector.
        token_matrix: a :class:`attnkit.explain.token_matrix.TokenMatrix` drawn as a shaded table (token by
            token, e.g. generated tokens x the tokens they came from).
    """

    title: str
    text: str | None = None
    table: Sequence[Sequence[Any]] | None = None
    table_header: Sequence[str] | None = None
    figures: Sequence[Any] = field(default_factory=list)
    head_maps: HeadMaps | None = None
    token_matrix: Any = None


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}
.selector label{margin-right:1em}canvas{border:1px solid #ccc;image-rendering:pixelated;margin-top:.5em}
.hover{font-family:monospace;min-height:1.4em}
table.tokens td,table.tokens th{padding:.1em .25em;font-family:monospace;font-size:.8em;text-align:center}
table.tokens td{min-width:1.2em}
"""

_JS = """
(function () {
  function decode(b64) {
    const s = atob(b64);
    const a = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
    return a;
  }
  function color(v) {  // white -> blue
    const t = v / 255;
    return [Math.round(255 * (1 - t)), Math.round(255 * (1 - 0.6 * t)), Math.round(255 * (1 - 0.15 * t))];
  }
  document.querySelectorAll(".headmaps").forEach(function (box) {
    const meta = JSON.parse(box.querySelector('script[type="application/json"]').textContent);
    const data = decode(meta.data);
    const H = meta.heads, Q = meta.lq, K = meta.lk, n = Q * K;
    const layerSel = box.querySelector("select.layer"), headSel = box.querySelector("select.head");
    const canvas = box.querySelector("canvas"), hover = box.querySelector(".hover");
    const ctx = canvas.getContext("2d");
    const cell = Math.max(2, Math.min(36, Math.floor(560 / Math.max(Q, K))));
    // Token labels are drawn for maps small enough to read: keys under the map, queries to its right.
    const kLabels = meta.ktok && K <= 80 ? meta.ktok : null, qLabels = meta.qtok && Q <= 80 ? meta.qtok : null;
    const labelPad = 70;
    canvas.width = K * cell + (qLabels ? labelPad + 30 : 0);
    canvas.height = Q * cell + (kLabels ? labelPad : 0);
    let current = new Float32Array(n);
    function addMap(l, h, weight) {
      const o = (l * H + h) * n, s = meta.scale[l * H + h] / 255 * weight;
      for (let i = 0; i < n; i++) current[i] += data[o + i] * s;
    }
    function draw() {
      const l = +layerSel.value, h = headSel.value;
      current = new Float32Array(n);
      if (h === "mean") { for (let k = 0; k < H; k++) addMap(l, k, 1 / H); } else { addMap(l, +h, 1); }
      let mx = 0;
      for (let i = 0; i < n; i++) mx = Math.max(mx, current[i]);
      const scale = mx > 0 ? 255 / mx : 0;
      const img = ctx.createImageData(K * cell, Q * cell);
      for (let q = 0; q < Q; q++) {
        for (let k = 0; k < K; k++) {
          const c = color(current[q * K + k] * scale);
          for (let dy = 0; dy < cell; dy++) {
            for (let dx = 0; dx < cell; dx++) {
              const p = ((q * cell + dy) * K * cell + k * cell + dx) * 4;
              img.data[p] = c[0]; img.data[p + 1] = c[1]; img.data[p + 2] = c[2]; img.data[p + 3] = 255;
            }
          }
        }
      }
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      ctx.putImageData(img, 0, 0);
      ctx.fillStyle = "#333";
      ctx.font = Math.min(12, Math.max(8, cell - 2)) + "px sans-serif";
      if (kLabels) {
        for (let k = 0; k < K; k++) {
          ctx.save();
          ctx.translate(k * cell + cell / 2 + 3, Q * cell + 4);
          ctx.rotate(Math.PI / 3);
          ctx.fillText(String(kLabels[k]).slice(0, 12), 0, 0);
          ctx.restore();
        }
      }
      if (qLabels) {
        for (let q = 0; q < Q; q++) {
          ctx.fillText(String(qLabels[q]).slice(0, 14), K * cell + 4, q * cell + cell / 2 + 4);
        }
      }
      box.dataset.drawn = l + ":" + h;
    }
    canvas.addEventListener("mousemove", function (e) {
      const r = canvas.getBoundingClientRect();
      const k = Math.floor((e.clientX - r.left) * canvas.width / r.width / cell);
      const q = Math.floor((e.clientY - r.top) * canvas.height / r.height / cell);
      if (q < 0 || q >= Q || k < 0 || k >= K) return;
      const qt = meta.qtok ? meta.qtok[q] : q, kt = meta.ktok ? meta.ktok[k] : k;
      hover.textContent = qt + " \\u2192 " + kt + ": " + current[q * K + k].toFixed(4);
    });
    layerSel.addEventListener("change", draw);
    headSel.addEventListener("change", draw);
    draw();
  });
})();
"""


def _figure_b64(fig: Any) -> str:
    if isinstance(fig, (bytes, bytearray)):
        if not bytes(fig[:8]) == b"\x89PNG\r\n\x1a\n":
            raise ValueError("report: figure bytes must be a PNG image")
        data = bytes(fig)
    elif hasattr(fig, "savefig"):
        from attnkit.explain.plots import figure_png

        data = figure_png(fig)
    else:
        raise TypeError(f"report: figures must be matplotlib figures or PNG bytes, got {type(fig).__name__}")
    return base64.b64encode(data).decode("ascii")


def _head_maps_html(hm: HeadMaps, index: int) -> str:
    hm.check()
    maps = hm.maps.detach().float().cpu().nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    layers, heads, lq, lk = maps.shape
    flat = maps.reshape(layers * heads, -1)
    peak = flat.amax(-1).clamp_min(1e-30)
    quant = torch.round(flat / peak[:, None] * 255).to(torch.uint8)
    key_tokens = hm.key_tokens if hm.key_tokens is not None else (hm.query_tokens if lq == lk else None)
    meta = {
        "layers": layers,
        "heads": heads,
        "lq": lq,
        "lk": lk,
        "scale": [float(p) for p in peak],
        "qtok": None if hm.query_tokens is None else [str(t) for t in hm.query_tokens],
        "ktok": None if key_tokens is None else [str(t) for t in key_tokens],
        "data": base64.b64encode(quant.numpy().tobytes()).decode("ascii"),
    }
    names = hm.layer_names if hm.layer_names is not None else [f"layer {i}" for i in range(layers)]
    layer_opts = "".join(f'<option value="{i}">{escape_html(n)}</option>' for i, n in enumerate(names))
    head_opts = '<option value="mean">mean of heads</option>' + "".join(
        f'<option value="{h}">head {h}</option>' for h in range(heads)
    )
    payload = script_json(meta)
    return (
        f'<div class="headmaps" id="headmaps-{index}"><div class="selector">'
        f'<label>Layer <select class="layer">{layer_opts}</select></label>'
        f'<label>Head <select class="head">{head_opts}</select></label></div>'
        f'<canvas></canvas><div class="hover"></div>'
        f'<script type="application/json">{payload}</script></div>'
    )


def _shade(value: float) -> str:
    """Background for a score in ``[-1, 1]``: white -> blue (positive) or red (negative)."""
    t = min(1.0, abs(value))
    if value >= 0:
        return f"rgb({round(255 * (1 - t))},{round(255 * (1 - 0.6 * t))},{round(255 * (1 - 0.15 * t))})"
    return f"rgb({round(255 * (1 - 0.15 * t))},{round(255 * (1 - 0.7 * t))},{round(255 * (1 - 0.7 * t))})"


def _token_matrix_html(tm: Any) -> str:
    from attnkit.explain.token_matrix import TokenMatrix, visible_token

    if not isinstance(tm, TokenMatrix):
        raise TypeError(f"report: token_matrix must be a TokenMatrix, got {type(tm).__name__}")
    tm.check()
    scores = tm.scores.detach().double().cpu().nan_to_num(0.0)
    peak = scores.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    shade = (scores / peak).tolist()
    head = "<tr><th></th>" + "".join(f"<th>{escape_html(visible_token(t))}</th>" for t in tm.column_tokens) + "</tr>"
    rows = []
    for label, values, cells in zip(tm.row_tokens, scores.tolist(), shade):
        tds = "".join(
            f'<td style="background:{_shade(c)}" title="{escape_html(f"{v:.4g}")}"></td>' for v, c in zip(values, cells)
        )
        rows.append(f"<tr><th>{escape_html(visible_token(label))}</th>{tds}</tr>")
    caption = f"<caption>{escape_html(tm.caption)}</caption>" if tm.caption else ""
    return f'<table class="tokens">{caption}{head}{"".join(rows)}</table>'


def _section_html(sec: Section, index: int) -> str:
    if not isinstance(sec, Section):
        raise TypeError(f"report: sections must be Section objects, got {type(sec).__name__}")
    parts = [f"<section><h2>{escape_html(sec.title)}</h2>"]
    if sec.text:
        parts += [f"<p>{escape_html(p.strip())}</p>" for p in str(sec.text).split("\n\n") if p.strip()]
    if sec.table is not None:
        rows = []
        if sec.table_header is not None:
            rows.append("<tr>" + "".join(f"<th>{escape_html(c)}</th>" for c in sec.table_header) + "</tr>")
        for row in sec.table:
            rows.append("<tr>" + "".join(f"<td>{escape_html(_cell(c))}</td>" for c in row) + "</tr>")
        parts.append("<table>" + "".join(rows) + "</table>")
    for fig in sec.figures:
        parts.append(f'<img alt="{escape_html(sec.title)}" src="data:image/png;base64,{_figure_b64(fig)}">')
    if sec.head_maps is not None:
        parts.append(_head_maps_html(sec.head_maps, index))
    if sec.token_matrix is not None:
        parts.append(_token_matrix_html(sec.token_matrix))
    parts.append("</section>")
    return "".join(parts)


def _cell(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.4g}"
    if isinstance(c, Tensor) and c.numel() == 1:
        return f"{float(c):.4g}"
    return str(c)


def report(
    path: str | os.PathLike,
    sections: Sequence[Section],
    *,
    title: str = "attnkit report",
    overwrite: bool = False,
) -> Path:
    """Write one self-contained HTML page: the attention dashboard to attach to a bug report.

    Args:
        path: the ``.html`` file to write.
        sections: :class:`Section` objects in order (text, tables, figures, layer x head map sets).
        title: page title and top heading.
        overwrite: replace an existing file (otherwise it is left untouched and an error raised).

    Returns:
        the path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        TypeError: a section is not a :class:`Section`, or a figure is neither a figure nor PNG bytes.
        ValueError: no sections, or head maps with inconsistent shapes/labels.

    The file is written with :func:`attnkit.io.atomic.atomic_write` (never partial, never clobbering). Images are
    inlined as base64 PNG; the layer/head selector is plain JavaScript drawing on a canvas; nothing is fetched
    from the network. Every string is escaped with :func:`escape_html` (HTML) or :func:`script_json` (inline
    JSON), so labels show as written.
    """
    sections = list(sections)
    if not sections:
        raise ValueError("report: got no sections; pass at least one Section")
    body = "".join(_section_html(s, i) for i, s in enumerate(sections))
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape_html(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{escape_html(title)}</h1>{body}<script>{_JS}</script></body></html>\n"
    )
    return atomic_write(path, page.encode("utf-8"), overwrite=overwrite, who="report")


def table_csv(section: Section) -> str:
    """The section's table as CSV text (RFC 4180, via :mod:`csv`): the header row first when there is one;
    cells as :func:`report` shows them, except floats, which keep full precision (``repr``)."""
    import csv
    import io

    if not isinstance(section, Section) or section.table is None:
        raise ValueError("table_csv: expected a Section with a table")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if section.table_header is not None:
        writer.writerow([str(h) for h in section.table_header])
    for row in section.table:
        writer.writerow([_csv_cell(c) for c in row])
    return buf.getvalue()


def _csv_cell(c: Any) -> str:
    if isinstance(c, Tensor) and c.numel() == 1:
        c = c.item()
    return repr(c) if isinstance(c, float) else str(c)


def save_table(section: Section, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the section's table to ``path`` as CSV (:func:`table_csv`), atomically.

    Raises:
        ValueError: the section has no table.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    return atomic_write(path, table_csv(section), overwrite=overwrite, who="save_table")


#: The report's stylesheet and script, for pages that embed :func:`render_section` output (``attnkit serve``).
STYLE, SCRIPT = _CSS, _JS


def render_section(section: Section, index: int = 0) -> str:
    """One section as an HTML fragment, exactly as :func:`report` writes it (user text escaped).

    ``index`` must be unique per page; the page needs :data:`STYLE` and, after the sections, :data:`SCRIPT`.

    Raises:
        TypeError, ValueError: as :func:`report`.
    """
    return _section_html(section, index)
