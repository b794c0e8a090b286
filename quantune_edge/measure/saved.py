"""Benchmark reports saved by bench, read back: the latest per target and model, as rows."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from quantune_edge.errors import InputError

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
