"""Plots rendered on the server as SVG: the posterior heatmap, perplexity bars and the
lineage graph. No JavaScript needed to see them; text is escaped."""

from __future__ import annotations

import math
from html import escape


def _color(w: float) -> str:
    """White -> deep green for a weight in [0, 1]."""
    w = max(0.0, min(1.0, w)) ** 0.6
    r, g, b = (int(255 + (c - 255) * w) for c in (21, 101, 52))
    return f"rgb({r},{g},{b})"


def heatmap(rows: list[str], cols: list[str], value: dict[tuple[str, str], float], cell: int = 30) -> str:
    """Domains (rows) x ELMs (columns), each cell the domain's posterior weight on the ELM."""
    if not rows or not cols:
        return ""
    left = 8 + 7 * max(len(r) for r in rows)
    longest = 6.2 * max(len(c) for c in cols)
    top = 14 + longest * 0.82  # labels rotated by 55 degrees: sin 55 ~ 0.82, cos 55 ~ 0.57
    w, h = left + cell * len(cols) + 10 + longest * 0.57, top + cell * len(rows) + 10
    out = [f'<svg class="heatmap" viewBox="0 0 {w:.0f} {h:.0f}" width="{w:.0f}" height="{h:.0f}" role="img" '
           f'aria-label="domain posterior heatmap: {len(rows)} domains by {len(cols)} ELMs" xmlns="http://www.w3.org/2000/svg">']
    for j, c in enumerate(cols):
        x = left + j * cell + cell / 2
        out.append(f'<text x="{x:.1f}" y="{top - 6}" transform="rotate(-55 {x:.1f} {top - 6})" class="lbl">{escape(c)}</text>')
    for i, r in enumerate(rows):
        y = top + i * cell
        out.append(f'<text x="{left - 6}" y="{y + cell / 2 + 4:.1f}" text-anchor="end" class="lbl">{escape(r)}</text>')
        for j, c in enumerate(cols):
            v = value.get((r, c), 0.0)
            x = left + j * cell
            out.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" rx="3" fill="{_color(v)}">'
                       f'<title>{escape(r)} → {escape(c)}: {v:.3f}</title></rect>')
            if v >= 0.05:
                tone = "hi" if v > 0.45 else "lo"
                out.append(f'<text x="{x + (cell - 2) / 2:.1f}" y="{y + cell / 2 + 3:.1f}" text-anchor="middle" '
                           f'class="pct {tone}">{round(v * 100):d}</text>')
    out.append("</svg>")
    return "".join(out)


def bars(items: list[tuple[str, float, str]], width: int = 560, bar: int = 22, title: str = "") -> str:
    """Horizontal bars (label, value, css class); shorter is better for perplexity."""
    items = [(lbl, v, cls) for lbl, v, cls in items if v is not None and math.isfinite(v)]
    if not items:
        return ""
    left = 10 + 7 * max(len(lbl) for lbl, _, _ in items)
    vmax = max(v for _, v, _ in items) * 1.05
    plot = width - left - 60
    h = 8 + bar * len(items)
    out = [f'<svg class="bars" viewBox="0 0 {width} {h}" width="100%" role="img" aria-label="{escape(title)}" '
           f'preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg">']
    for i, (lbl, v, cls) in enumerate(items):
        y = 4 + i * bar
        bw = max(1.0, plot * v / vmax)
        out.append(f'<text x="{left - 6}" y="{y + bar / 2 + 4:.1f}" text-anchor="end" class="lbl">{escape(lbl)}</text>')
        out.append(f'<rect x="{left}" y="{y + 3}" width="{bw:.1f}" height="{bar - 7}" rx="3" class="bar {escape(cls)}">'
                   f'<title>{escape(lbl)}: {v:.2f}</title></rect>')
        out.append(f'<text x="{left + bw + 5:.1f}" y="{y + bar / 2 + 4:.1f}" class="val">{v:,.1f}</text>')
    out.append("</svg>")
    return "".join(out)


# lineage layout: node box width and height, gaps between columns and between rows
_NODE_W, _NODE_H, _GAP_X, _GAP_Y = 150, 44, 70, 18


def lineage(nodes: dict[str, dict], edges: list[tuple[str, str, float]], target: str, href=None) -> str:
    """A left-to-right graph: the seed, then each generation of parents, then the ELM.
    nodes: {id: {"label", "sub"}}, edges: (parent, child, weight)."""
    cols = _lineage_columns(nodes, edges)
    w, h = _lineage_size(cols)
    pos = _lineage_positions(cols, h)
    out = [f'<svg class="lineage" viewBox="0 0 {w} {h:.0f}" width="{w}" height="{h:.0f}" role="img" '
           f'aria-label="lineage of {escape(target)}" xmlns="http://www.w3.org/2000/svg">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" markerHeight="9" '
           'markerUnits="userSpaceOnUse" orient="auto"><path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead"/></marker></defs>']
    # edges first so that the node boxes are drawn over their ends
    out += [_lineage_edge(p, c, wt, pos) for p, c, wt in edges if p in pos and c in pos]
    out += [_lineage_node(n, nodes[n], x, y, target, href) for n, (x, y) in pos.items()]
    out.append("</svg>")
    return "".join(out)


def _lineage_depths(nodes: dict[str, dict], edges: list[tuple[str, str, float]]) -> dict[str, int]:
    """Each node's generation: 0 without parents, else one more than its deepest parent.
    A cycle is cut where it would revisit a node on the current path; depths are memoised,
    so within a cycle they depend on the order of `nodes`."""
    parents: dict[str, list[str]] = {}
    for p, c, _ in edges:
        parents.setdefault(c, []).append(p)
    depth: dict[str, int] = {}

    def d(n: str, seen=()) -> int:
        if n not in depth:
            ps = [p for p in parents.get(n, []) if p not in seen]
            depth[n] = 0 if not ps else 1 + max(d(p, (*seen, n)) for p in ps)
        return depth[n]

    for n in nodes:
        d(n)
    return depth


def _lineage_columns(nodes: dict[str, dict], edges: list[tuple[str, str, float]]) -> dict[int, list[str]]:
    """{generation: node ids}, each column sorted by label."""
    depth = _lineage_depths(nodes, edges)
    cols: dict[int, list[str]] = {}
    for n in sorted(nodes, key=lambda n: (depth[n], nodes[n]["label"])):
        cols.setdefault(depth[n], []).append(n)
    return cols


def _lineage_size(cols: dict[int, list[str]]) -> tuple[int, int]:
    """Width and height of the drawing: a 10px margin around the widest and tallest column."""
    ncol = max(cols) + 1 if cols else 1
    nrow = max(len(v) for v in cols.values()) if cols else 1
    return ncol * (_NODE_W + _GAP_X) - _GAP_X + 20, nrow * (_NODE_H + _GAP_Y) - _GAP_Y + 20


def _lineage_positions(cols: dict[int, list[str]], h: int) -> dict[str, tuple[int, float]]:
    """Top-left corner of each node's box; every column is centred vertically."""
    pos = {}
    for ci, ns in cols.items():
        off = (h - 20 - (len(ns) * (_NODE_H + _GAP_Y) - _GAP_Y)) / 2
        for ri, n in enumerate(ns):
            pos[n] = (10 + ci * (_NODE_W + _GAP_X), 10 + off + ri * (_NODE_H + _GAP_Y))
    return pos


def _lineage_edge(p: str, c: str, wt: float, pos: dict[str, tuple[int, float]]) -> str:
    """A curve from the parent's right side to the child's left side, as thick as its weight."""
    x1, y1 = pos[p][0] + _NODE_W, pos[p][1] + _NODE_H / 2
    x2, y2 = pos[c][0], pos[c][1] + _NODE_H / 2
    mx = (x1 + x2) / 2
    sw = 1 + 4 * wt
    return (f'<path d="M{x1:.1f},{y1:.1f} C{mx:.1f},{y1:.1f} {mx:.1f},{y2:.1f} {x2 - 2:.1f},{y2:.1f}" '
            f'class="edge" stroke-width="{sw:.1f}" marker-end="url(#arrow)"><title>{escape(p)} → {escape(c)}: '
            f'{wt:.3f}</title></path>'
            f'<text x="{mx:.1f}" y="{(y1 + y2) / 2 - 4:.1f}" text-anchor="middle" class="ew">{wt:.2f}</text>')


def _lineage_node(n: str, info: dict, x: int, y: float, target: str, href) -> str:
    """A node's box with its label and subtitle; a link to its page unless it is the seed."""
    cls = "node target" if n == target else ("node seed" if info.get("seed") else "node")
    link = href(n) if href and not info.get("seed") else None
    box = (f'<rect x="{x}" y="{y:.1f}" width="{_NODE_W}" height="{_NODE_H}" rx="8" class="{cls}"/>'
           f'<text x="{x + _NODE_W / 2}" y="{y + 18:.1f}" text-anchor="middle" class="nl">{escape(info["label"][:20])}</text>'
           f'<text x="{x + _NODE_W / 2}" y="{y + 34:.1f}" text-anchor="middle" class="ns">{escape(info.get("sub", "")[:24])}</text>')
    return f'<a href="{escape(link)}">{box}</a>' if link else box


def signed_bars(items: list[tuple[str, float, float | None]], width: int = 560, bar: int = 22, title: str = "",
                unit: str = "") -> str:
    """Horizontal bars around zero (label, value, error): positive to the right, negative to the
    left, each with its error as a whisker (e.g. Shapley values with their standard error)."""
    items = [(lbl, v, e) for lbl, v, e in items if v is not None and math.isfinite(v)]
    if not items:
        return ""
    left = 10 + 7 * max(len(lbl) for lbl, _, _ in items)
    span = max(abs(v) + (e or 0) for _, v, e in items) * 1.1 or 1.0
    plot = width - left - 70
    zero = left + plot / 2
    scale = plot / 2 / span
    h = 8 + bar * len(items)
    out = [f'<svg class="bars signed" viewBox="0 0 {width} {h}" width="100%" role="img" aria-label="{escape(title)}" '
           f'preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg">',
           f'<line x1="{zero:.1f}" y1="0" x2="{zero:.1f}" y2="{h}" class="axis"/>']
    for i, (lbl, v, e) in enumerate(items):
        y = 4 + i * bar
        x0, bw = (zero, v * scale) if v >= 0 else (zero + v * scale, -v * scale)
        cls = "pos" if v >= 0 else "neg"
        out.append(f'<text x="{left - 6}" y="{y + bar / 2 + 4:.1f}" text-anchor="end" class="lbl">{escape(lbl)}</text>')
        out.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(bw, 1.0):.1f}" height="{bar - 7}" rx="3" '
                   f'class="bar {cls}"><title>{escape(lbl)}: {v:+.4f}{escape(unit)}</title></rect>')
        if e:
            cy = y + bar / 2
            out.append(f'<line x1="{zero + (v - e) * scale:.1f}" y1="{cy:.1f}" x2="{zero + (v + e) * scale:.1f}" '
                       f'y2="{cy:.1f}" class="err"/>')
        out.append(f'<text x="{width - 4}" y="{y + bar / 2 + 4:.1f}" text-anchor="end" class="val">{v:+.4f}</text>')
    out.append("</svg>")
    return "".join(out)
