"""Result records written next to the artefacts they describe (JSON, with a schema version)."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def jsonable(value: Any) -> Any:
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return jsonable(value.item())
    return value


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Written whole or not at all (a temp file of its own beside it, then an atomic rename): a crash
    or a full disk never leaves a half-written file where the last good one was."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict) -> None:
    write_atomic(path, json.dumps(jsonable(data), indent=2) + "\n")


@dataclass
class CompileReport:
    """Everything ``compile`` learned: written as ``compile.json`` beside the models."""

    model: dict
    preprocessing: dict
    calibration: dict
    quantization: dict
    onnx_ops: dict
    tflite_ops: dict
    fusions: dict
    quantize_ops: dict
    sizes_bytes: dict
    timings_s: dict
    verification: dict
    accuracy: dict
    files: dict
    notes: list[str] = field(default_factory=list)
    trace: dict | None = None  # TFLite op -> ONNX nodes (:mod:`tracing`); None in compiles made before it
    task: dict | None = None  # what judges the model (:mod:`tasks`); None in compiles made before tasks: a classifier
    kind: str = "quantune-edge/compile"
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=now_iso)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> CompileReport:
        data = json.loads(Path(path).read_text())
        if data.get("kind") != "quantune-edge/compile":
            raise ValueError(f"{path} is not a compile.json")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
