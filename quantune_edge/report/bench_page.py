"""The bench comparison as a table's labels and a self-contained HTML page with a latency chart."""
from __future__ import annotations

import html

from quantune_edge.common.outputs import PAGE_MARKER
from quantune_edge.measure.saved import ResultRow

SAME_FILE_NOTE = ("(= …) marks a file with the same bytes as another row's (a mixed model with no float layer is the int8 file), "
                  "measured again: the two rows differ by run-to-run noise only")


def display_labels(rows: list[ResultRow]) -> tuple[list[str], str | None]:
    """Each row's label, with "(= int8)" where an earlier row of the same target benchmarked the same
    bytes (a mixed model with no float layer is the int8 file): two measurements of one model, so the
    gap between them is run-to-run noise, not a difference between models. Second: the note that
    explains the mark, when a row has it."""
    seen: dict[tuple[str, str], str] = {}
    labels = []
    for r in rows:
        first = seen.setdefault((r.target, r.sha256), r.label)
        labels.append(r.label if first == r.label else f"{r.label} (= {first})")
    marked = any(label != r.label for r, label in zip(rows, labels))
    return labels, SAME_FILE_NOTE if marked else None


def latency_chart(rows: list[ResultRow]) -> str:
    """Horizontal bars of p50 latency per target and model, with a tick at p90 (inline SVG)."""
    bar_h, gap, left, width = 22, 8, 300, 460
    top = max(r.p90_ms for r in rows) or 1.0
    height = len(rows) * (bar_h + gap) + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" height="{height}" role="img" '
             'aria-label="latency per model and target">']
    colours = {"float32": "#8c8c8c", "int8": "#2c7fb8", "mixed": "#31a354"}
    for i, r in enumerate(rows):
        y = 20 + i * (bar_h + gap)
        w = r.p50_ms / top * width
        w90 = r.p90_ms / top * width
        name = f"{r.target}{' (emulated)' if r.emulated else ''} · {r.label}"
        parts.append(f'<text x="{left - 8}" y="{y + bar_h * 0.7:.1f}" text-anchor="end" font-size="13">{html.escape(name)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colours.get(r.label, "#756bb1")}">'
                     f'<title>p50 {r.p50_ms:.2f} ms</title></rect>')
        parts.append(f'<line x1="{left + w90:.1f}" x2="{left + w90:.1f}" y1="{y}" y2="{y + bar_h}" stroke="black" stroke-width="2"/>')
        parts.append(f'<text x="{left + w90 + 6:.1f}" y="{y + bar_h * 0.7:.1f}" font-size="12">{r.p50_ms:.2f} ms</text>')
    parts.append(f'<text x="{left}" y="{height - 6}" font-size="11" fill="#555">bar: p50 latency, tick: p90</text></svg>')
    return "".join(parts)


def render_html(rows: list[ResultRow], title: str = "quantune-edge benchmark report") -> str:
    """One self-contained page (no scripts, no external files), viewable offline."""
    head = ("target", "arch", "runtime", "model", "size", "threads", "p50 ms", "p90 ms", "p99 ms", "vs float", "runs")
    body = []
    labels, same_file = display_labels(rows)
    for r, label in zip(rows, labels):
        cells = (f"{r.target}{' <em>(emulated)</em>' if r.emulated else ''}", r.machine, html.escape(r.runtime),
                 f"{html.escape(label)}<br><small>{html.escape(r.model)}</small>", f"{r.size_bytes / 1e6:.2f} MB",
                 r.threads, f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}",
                 f"{r.speedup_vs_float:.2f}x" if r.speedup_vs_float else "–", r.runs)
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    note = ("<p><strong>Emulated targets</strong> run under qemu-user: their latency shows the pipeline works, "
            "it is not a real board's figure.</p>" if any(r.emulated for r in rows) else "")
    if same_file:
        note += f"<p>{html.escape(same_file)}</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{PAGE_MARKER}<title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:nth-child(-n+4){{text-align:left}}</style>
</head><body><h1>{html.escape(title)}</h1>{note}
<h2>Latency</h2>{latency_chart(rows)}
<h2>Models per target</h2><table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{''.join(body)}</table>
</body></html>
"""
