"""The run report: ``report.json`` (every section as data) and ``report.html`` (one self-contained
page: images inlined as data URIs, charts as inline SVG, no scripts, nothing fetched)."""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from quantune_edge.common.outputs import PAGE_MARKER
from quantune_edge.common.records import SCHEMA_VERSION, now_iso
from quantune_edge.compile import artifacts as layout
from quantune_edge.measure.saved import ResultRow, rows_from
from quantune_edge.report.bench_page import display_labels, latency_chart
from quantune_edge.tasks.base import FLOAT32_FOR_LABELS, format_metric, metric_points

TOP_LAYERS = 10
LABELS = ("float32", "int8", "mixed")


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def build(out: Path, compiled: Path, bench_reports: list[Path], stages: dict, device_eval: dict | None = None) -> dict:
    """Everything the page shows, gathered from the stage outputs."""
    comp, ana, tun = (_read(compiled / name) for name in (layout.REPORT, layout.ANALYSIS_JSON, layout.TUNE_JSON))
    by_index = {layer["index"]: layer for layer in ana.get("layers", [])}
    ref, chosen = tun.get("reference", {}), tun.get("chosen", {})
    accuracy = {"is": ref.get("accuracy_is"), "samples": ref.get("eval_samples"), "judged_against": ref.get("judged_against", "labels"),
                "host": {"float32": ref.get("float32_accuracy"), "int8": (ref.get("int8") or {}).get("accuracy"),
                         "mixed": chosen.get("accuracy")},
                "mixed_vs_float32": chosen.get("vs_float32"), "device": device_eval}
    rows = rows_from([(p, json.loads(p.read_text())) for p in bench_reports if p.is_file()])
    points = []
    for row in rows:
        acc = accuracy["host"].get(row.label)
        if acc is not None:
            points.append({"target": row.target, "label": row.label, "p50_ms": row.p50_ms, "accuracy": acc,
                           "chosen": row.label == "mixed"})
    return {
        "schema_version": SCHEMA_VERSION, "kind": "quantune-edge/run-report", "created": now_iso(),
        "model": comp.get("model", {}),
        "compile": {k: comp.get(k) for k in ("quantization", "fusions", "tflite_ops", "quantize_ops", "sizes_bytes",
                                             "verification", "timings_s", "accuracy")},
        "analysis": {"metric": ana.get("metric"), "invocations": ana.get("invocations"), "timings_s": ana.get("timings_s"),
                     "model_output": ana.get("model_output"), "layers": len(by_index),
                     "most_sensitive": [by_index[i] for i in ana.get("sensitivity_order", [])[:TOP_LAYERS]]},
        "tune": {"budget": tun.get("budget"), "chosen_layers": chosen.get("layers", []),
                 "drop_points": chosen.get("drop_points"), "host_latency_ratio": chosen.get("latency_ratio"),
                 "device_latency_ratio": chosen.get("device_latency_ratio"),
                 "quantize_ops": chosen.get("quantize_ops"), "evaluations": (tun.get("search") or {}).get("evaluations")},
        "accuracy": accuracy,
        "device": [r.to_dict() for r in rows],
        "pareto": {"device": points, "host": tun.get("pareto")},
        "latency_budget": latency_budget_check(tun.get("budget"), rows),
        "stages": stages,
    }


def latency_budget_check(budget: dict | None, rows: list[ResultRow]) -> dict | None:
    """A --max-latency-ratio budget read off every target's bench: tune times it on one (the run's
    first target, or the host), and another device can disagree. A target is over only beyond the
    margin one timing moves (these are unpaired runs), not at the first hundredth above."""
    if not budget or budget.get("max_latency_ratio") is None:
        return None
    from quantune_edge.tune.tuning import REMEASURE_MARGIN

    limit = budget["max_latency_ratio"]
    source = budget.get("latency_source") or {}
    p50 = {(r.target, r.label): r.p50_ms for r in rows}
    checked = []
    for target in dict.fromkeys(r.target for r in rows):
        mixed, int8 = p50.get((target, "mixed")), p50.get((target, "int8"))
        if mixed and int8:
            ratio = mixed / int8
            checked.append({"target": target, "latency_ratio": ratio, "over": ratio > limit * (1 + REMEASURE_MARGIN)})
    return {"max_latency_ratio": limit, "timed_on": source["target"]["name"] if source.get("kind") == "device" else "host",
            "margin": REMEASURE_MARGIN, "targets": checked}


def budget_warnings(check: dict | None) -> list[str]:
    """One line per target where the bench measured the mixed model beyond the latency budget."""
    lines = []
    for t in (check or {}).get("targets", []):
        if t["over"]:
            hint = ("tune's paired timing there met it; this device's timings move more than that" if t["target"] == check["timed_on"]
                    else f"tune with --latency-source {t['target']} to budget for it")
            lines.append(f"latency budget {check['max_latency_ratio']:g}x full int8 (timed on {check['timed_on']}) is exceeded on "
                         f"{t['target']}: mixed runs at {t['latency_ratio']:.2f}x int8 there in the bench; {hint}")
    return lines


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p><em>{html.escape(alt)}: not available</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" style="max-width:100%" src="data:image/png;base64,{data}">'


def _table(head: list[str], rows: list[list]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>{cells}</table>"


def _pct(v) -> str:
    return f"{100 * v:.1f} %" if isinstance(v, (int, float)) else "–"


def accuracy_latency_chart(points: list[dict], metric: str = "top-1") -> str:
    """The task's metric (host) against on-device p50 latency, one marker per model and target; the
    chosen mixed model is ringed. Top-1 and mAP are drawn in points."""
    if not points:
        return "<p><em>no on-device measurements</em></p>"
    w, h, pad = 560, 320, 60
    xs, ys = [p["p50_ms"] for p in points], [metric_points(p["accuracy"], metric) for p in points]
    finite = [y for y in ys if math.isfinite(y)] or [0.0]
    ys = [y if math.isfinite(y) else max(finite) for y in ys]  # fidelity's float32 (inf dB) drawn at the top
    margin = max(2.0, 0.05 * (max(finite) - min(finite)))
    x0, x1 = 0.0, max(xs) * 1.1
    y0, y1 = min(ys) - margin, max(ys) + margin
    sx = lambda v: pad + (v - x0) / (x1 - x0 or 1) * (w - 2 * pad)  # noqa: E731
    sy = lambda v: h - pad + (y0 - v) / (y1 - y0 or 1) * (h - 2 * pad)  # noqa: E731
    colours = {"float32": "#8c8c8c", "int8": "#2c7fb8", "mixed": "#31a354"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="accuracy vs latency">',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle" font-size="12">on-device p50 latency (ms)</text>',
             f'<text x="16" y="{h / 2}" font-size="12" transform="rotate(-90 16 {h / 2})" text-anchor="middle">{html.escape(metric)} (host)</text>',
             f'<text x="{pad}" y="{h - pad + 16}" font-size="10">{x0:.0f}</text>',
             f'<text x="{w - pad}" y="{h - pad + 16}" font-size="10" text-anchor="end">{x1:.1f}</text>',
             f'<text x="{pad - 4}" y="{sy(y1) + 4}" font-size="10" text-anchor="end">{y1:.1f}</text>',
             f'<text x="{pad - 4}" y="{sy(y0) + 4}" font-size="10" text-anchor="end">{y0:.1f}</text>']
    for n, (p, y) in enumerate(zip(points, ys)):
        cx, cy = sx(p["p50_ms"]), sy(y)
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{colours.get(p["label"], "#756bb1")}">'
                     f'<title>{html.escape(p["target"])} {p["label"]}: {p["p50_ms"]:.2f} ms, {html.escape(format_metric(p["accuracy"], metric))}</title></circle>')
        if p["chosen"]:
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="11" fill="none" stroke="#d62728" stroke-width="2"/>')
        parts.append(f'<text x="{cx + 9:.1f}" y="{cy - 8 - 13 * (n % 3):.1f}" font-size="11">{html.escape(p["target"])} · {p["label"]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _budget(budget: dict | None, metric: str = "top-1") -> str:
    """The tune budget in words: which one, where latency was timed, met or not."""
    if not budget:
        return "budget: unknown"
    source = budget.get("latency_source") or {}
    where = f"on {source['target']['name']}" if source.get("kind") == "device" else "on the host"
    if budget.get("max_latency_ratio") is not None:
        text = f"latency at most {budget['max_latency_ratio']:g}x full int8, timed {where}"
    elif budget.get("float_layers") is not None:
        text = f"{budget['float_layers']} float layers"
    elif budget.get("min_sqnr_db") is not None:
        text = f"every output at least {budget['min_sqnr_db']:g} dB SQNR against float32"
    else:
        drop = budget.get("max_drop_points", 0)
        text = f"{metric} at most {drop:g} point{'' if drop == 1 else 's'} below float32"
    return f"budget: {text} ({'met' if budget.get('met') else 'not met, best found'})"


def _reference(against: str | None, metric: str) -> str:
    """Say when the samples had no labels and the float32 model's own outputs were the reference."""
    if against != FLOAT32_FOR_LABELS or "float32" in metric:  # "top-1 agreement with float32" says it already
        return ""
    return ", <strong>judged against the float32 model's own outputs</strong> (the samples have no labels)"


def _versus_float(vs: dict | None) -> str:
    if not vs:
        return ""
    lo, hi = vs["drop_points_ci95"]
    return (f"<p>mixed vs float32, image by image: {vs['images_lost']} images only float32 gets right, {vs['images_won']} only mixed; "
            f"on new images like these the drop is {lo:.1f} to {hi:.1f} points (95 %)</p>")


def _device_accuracy(device: dict | None) -> str:
    """The task's metric computed from the outputs each device produced, next to the host's."""
    if not device:
        return ""
    metric = device.get("metric", "top-1")
    rows = [[t, label, r["machine"], format_metric(r["value"], metric), format_metric(r["host_value"], metric),
             _pct(r["agreement_with_host"]) if "agreement_with_host" in r else f"max |Δ output| {r['max_abs_diff_vs_host']:.3g}"]
            for t, models in device["targets"].items() for label, r in models.items()]
    return (f"<p>on the devices ({device['samples']} samples, run by the agent there; {html.escape(metric)} computed from the "
            f"outputs the device produced)</p>"
            + _table(["target", "model", "arch", f"{metric} (device)", f"{metric} (host)", "device vs host"], rows))


def _onnx_nodes(layer: dict) -> str:
    """'name (OpType), …' of the ONNX nodes a layer came from."""
    return ", ".join(f"{n} ({o})" for n, o in zip(layer.get("onnx_nodes") or [], layer.get("onnx_ops") or [])) or "–"


def render(data: dict, compiled: Path) -> str:
    m, c, a, t, acc = data["model"], data["compile"], data["analysis"], data["tune"], data["accuracy"]
    metric = acc.get("is") or "top-1"
    sizes = c.get("sizes_bytes") or {}
    q = c.get("quantize_ops") or {}
    patterns = ((c.get("fusions") or {}).get("float32") or {}).get("patterns", [])
    verify = c.get("verification") or {}
    compile_rows = [
        ["fused (float32)", ", ".join(f"{p['pattern']} {p['fused']}/{p['in_onnx']}" for p in patterns if p["in_onnx"]) or "–"],
        ["left unfused", str(sum(p.get("left_unfused", 0) for p in patterns))],
        ["QUANTIZE / DEQUANTIZE ops (int8)", f"{q.get('int8_quantize', '?')} / {q.get('int8_dequantize', '?')}"],
        ["sizes", ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())],
        *[[f"{k.replace('_', ' ')}", f"cosine min {v.get('cosine_min', 0):.5f}"
           + (f", top-1 agreement {_pct(v['top1_agreement'])}" if "top1_agreement" in v else "")]
          for k, v in verify.items() if isinstance(v, dict) and "cosine_min" in v],
    ]
    layers = [[i + 1, l["index"], _onnx_nodes(l), l["short_name"], l["op_type"], f"{l.get('local_rmse_lsb') or 0:.2f}",
               f"{100 * l['output_share']:.1f} %" if l.get("output_share") is not None else "–",
               f"{l['act_sqnr_db']:.1f}" if isinstance(l["act_sqnr_db"], (int, float)) else l["act_sqnr_db"]]
              for i, l in enumerate(a.get("most_sensitive") or [])]
    chosen = [[l["index"], _onnx_nodes(l), l["short_name"], l["op_type"]] for l in t.get("chosen_layers") or []]
    rows = [ResultRow(**r) for r in data["device"]]
    labels, note = display_labels(rows)
    int8_p50 = {r.target: r.p50_ms for r in rows if r.label == "int8"}  # what a latency budget is measured against
    device = [[r.target + (" (emulated)" if r.emulated else ""), r.machine, label, f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}",
               f"{r.p99_ms:.2f}", f"{r.speedup_vs_float:.2f}x" if r.speedup_vs_float else "–",
               f"{r.p50_ms / int8_p50[r.target]:.2f}x" if int8_p50.get(r.target) else "–", f"{r.size_bytes / 1e6:.2f} MB"]
              for r, label in zip(rows, labels)]
    same_file = f"<p>{html.escape(note)}</p>" if note else ""
    emulated = any(r.emulated for r in rows)
    stage_rows = [[s, v.get("status", "?"), "cached" if v.get("cached") else f"{v.get('seconds', 0):.1f} s"]
                  for s, v in data.get("stages", {}).items()]
    title = f"quantune-edge report: {Path(m.get('path', 'model')).name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{PAGE_MARKER}<title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}}h2{{border-bottom:1px solid #ddd}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>sha256 {html.escape(str(m.get('sha256', ''))[:16])}… · weights {html.escape(str((c.get('quantization') or {}).get('weights', '')))} ·
generated {html.escape(data['created'])}</p>
<h2>Compile</h2>{_table(['', ''], compile_rows)}
<h2>Local metrics and sensitivity</h2>
<p>score: {html.escape(str(a.get('metric')))}; {html.escape(json.dumps(a.get('invocations')))} invocations over {a.get('layers')} layers</p>
{_img(compiled / layout.ANALYSIS_PNG, 'local metrics per layer')}
{_table(['rank', '#', 'ONNX nodes', 'TFLite', 'op', 'own error (LSB)', 'share of logit error', 'activation SQNR dB'], layers)}
<h2>Chosen float layers</h2>
<p>{html.escape(_budget(t.get('budget'), metric))}; {t.get('evaluations')} evaluations; Q/DQ ops {t.get('quantize_ops')}</p>
{_table(['#', 'ONNX nodes', 'TFLite', 'op'], chosen) if chosen else '<p>none: full int8 meets the budget</p>'}
<h2>Accuracy</h2><p>{html.escape(metric)} on {acc.get('samples')} samples (host){_reference(acc.get('judged_against'), metric)}</p>
{_table(['model', metric], [[k, format_metric(v, metric)] for k, v in acc['host'].items()])}
{_versus_float(acc.get('mixed_vs_float32'))}
{_device_accuracy(acc.get('device'))}
<h2>On-device latency</h2>
{'<p><strong>Emulated targets</strong> run under qemu-user: their latency shows that the pipeline works, not a real board’s speed.</p>' if emulated else ''}
{latency_chart(rows) if rows else '<p><em>no targets</em></p>'}
{_table(['target', 'arch', 'model', 'p50 ms', 'p90 ms', 'p99 ms', 'vs float', 'latency ÷ full int8', 'size'], device)}{same_file}
{''.join(f'<p><strong>{html.escape(w)}</strong></p>' for w in budget_warnings(data.get('latency_budget')))}
<h2>{html.escape(metric)} vs latency</h2>{accuracy_latency_chart(data['pareto']['device'], metric)}
{_img(compiled / layout.PARETO_PNG, 'host Pareto sweep') if data['pareto'].get('host') else ''}
<h2>Stages</h2>{_table(['stage', 'status', 'time'], stage_rows)}
</body></html>
"""
