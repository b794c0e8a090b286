"""Reading saved benchmark reports back: the comparison table and a self-contained HTML page."""
from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import InputError
from .outputs import PAGE_MARKER

SCHEMA_VERSION = 1


@dataclass
class ResultRow:
    target: str
    emulated: bool
    machine: str
    runtime: str
    label: str
    model: str
    sha256: str
    size_bytes: int
    threads: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    speedup_vs_float: float | None
    created: str
    report: str

    def to_dict(self) -> dict:
        return asdict(self)


def load_reports(results_dir: str | Path) -> list[tuple[Path, dict]]:
    """Every bench report under the folder (newest last); files that are not bench reports are skipped."""
    folder = Path(results_dir)
    if not folder.is_dir():
        raise InputError(f"results folder {folder} does not exist (run 'quantune-edge bench' first)")
    found = []
    for path in sorted(folder.glob("*/*/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("kind") == "bench" and "latency_ms" in data and "target" in data:
            found.append((path, data))
    return found


def summarize(results_dir: str | Path) -> list[ResultRow]:
    """The latest report per (target, local model file) under a results folder."""
    rows = rows_from(load_reports(results_dir))
    if not rows:
        raise InputError(f"no benchmark reports under {results_dir}")
    return rows


def rows_from(reports: list[tuple[Path, dict]]) -> list[ResultRow]:
    """The latest of the given reports per (target, local model file), with speed-up vs the float32
    model from the same folder (two files with the same bytes, e.g. an int8 and a mixed model with no
    float layer, stay two rows)."""
    latest: dict[tuple[str, str], tuple[Path, dict]] = {}
    for path, data in reports:
        latest[(data["target"]["name"], str(Path(data["host"]["local_path"]).resolve()))] = (path, data)
    floats = {}
    for (target, _local), (_p, data) in latest.items():
        if data["host"]["label"] == "float32":
            floats[(target, str(Path(data["host"]["local_path"]).parent))] = data["latency_ms"]["p50"]
    rows = []
    for (target, _local), (path, data) in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[1][1]["host"]["local_path"])):
        lat = data["latency_ms"]
        ref = floats.get((target, str(Path(data["host"]["local_path"]).parent)))
        runtime = data.get("runtime") or {}
        rows.append(ResultRow(
            target=target, emulated=bool(data["target"].get("emulated")), machine=data["device"]["machine"],
            runtime=f"{runtime.get('package', '?')} {runtime.get('version', '')}".strip(), label=data["host"]["label"],
            model=data["host"]["local_path"], sha256=data["model"]["sha256"], size_bytes=data["model"]["size_bytes"],
            threads=data["settings"]["threads"], p50_ms=lat["p50"], p90_ms=lat["p90"], p99_ms=lat["p99"], mean_ms=lat["mean"],
            runs=data["settings"]["runs"], speedup_vs_float=(ref / lat["p50"]) if ref else None,
            created=data.get("created", ""), report=str(path)))
    return rows


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
