"""Shared fixtures: real assets (shipped demo + ../shared), small ONNX graphs built in code, and
compiled models cached per session so the slow conversion of a real model runs once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "assets"
DEMO_MODEL = REPO / "demo" / "models" / "efficientnet-lite0.onnx"
DEMO_IMAGES = REPO / "demo" / "images"


def pytest_collection_modifyitems(config, items):
    """``QUANTUNE_TEST_SHUFFLE=SEED`` runs the tests in an order shuffled by SEED (issue 29: no test may
    depend on another having run first). The seed is printed, so a failing order can be replayed."""
    seed = os.environ.get("QUANTUNE_TEST_SHUFFLE")
    if seed:
        import random

        random.Random(int(seed)).shuffle(items)
        print(f"\ntests shuffled with QUANTUNE_TEST_SHUFFLE={seed}")


@pytest.fixture(autouse=True)
def fresh_rng(request):
    """A module with ``RNG_SEED`` gets a fresh ``RNG`` seeded by it for each test, so a test's random
    data never depends on which tests drew from the module's generator before it."""
    seed = getattr(request.module, "RNG_SEED", None)
    if seed is not None:
        request.module.RNG = np.random.default_rng(seed)


def shared(path: str) -> Path:
    full = SHARED / path
    if not full.exists():
        pytest.fail(f"test asset missing: {full} (../shared/ must sit beside the repository)")
    return full


# ---------------------------------------------------------------- small ONNX graphs built in code

def _init(name: str, array: np.ndarray, dtype=np.float32):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array, dtype), name)


class GraphBuilder:
    """Tiny helper over onnx.helper so tests can write conv nets in a few lines."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes, self.inits, self.rng, self.n = [], [], np.random.default_rng(seed), 0

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def node(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        from onnx import helper

        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out.replace("_", "/", 1), domain=domain, **attrs))
        return out

    def const(self, array, prefix: str = "c", dtype=np.float32) -> str:
        name = self._name(prefix)
        self.inits.append(_init(name, array, dtype))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, pad: int | None = None, group: int = 1) -> str:
        w = self.rng.normal(0, np.sqrt(2.0 / (k * k * cin / group)), (cout, cin // group, k, k))
        b = self.rng.normal(0, 0.1, cout)
        p = k // 2 if pad is None else pad
        return self.node("Conv", [x, self.const(w, "w"), self.const(b, "b")], kernel_shape=[k, k], strides=[stride, stride], pads=[p] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        return self.node("BatchNormalization", [x, self.const(r.uniform(0.5, 1.5, c)), self.const(r.normal(0, 0.1, c)),
                                                 self.const(r.normal(0, 0.1, c)), self.const(r.uniform(0.5, 1.5, c))], epsilon=1e-5)

    def relu6(self, x: str) -> str:
        return self.node("Clip", [x, self.const(np.array(0.0)), self.const(np.array(6.0))])

    def head(self, x: str, c: int, classes: int = 10) -> str:
        g = self.node("GlobalAveragePool", [x])
        f = self.node("Flatten", [g], axis=1)
        w = self.rng.normal(0, 0.3, (c, classes))
        return self.node("Gemm", [f, self.const(w, "fc_w"), self.const(self.rng.normal(0, 0.1, classes), "fc_b")])

    def model(self, x_shape: list, out: str, opset: int = 13, extra_opsets: dict | None = None, x_name: str = "input",
              more_outputs: tuple[str, ...] = ()):
        import onnx
        from onnx import TensorProto, helper

        outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, [x_shape[0], None])]
        outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, [x_shape[0], None, None, None]) for name in more_outputs]
        graph = helper.make_graph(
            self.nodes, "test", [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, x_shape)], outputs, self.inits,
        )
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def graph_model(builder: GraphBuilder, inputs: list, out: str):
    """A model of the builder's nodes with several named float inputs ((name, shape) pairs) and one output."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(builder.nodes, "test", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, None])], builder.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def image_and_vector_net():
    """Two inputs: an image branch (conv, conv, pool) and a vector branch (Gemm) joined into 5 logits."""
    from onnx import helper

    b = GraphBuilder(1)
    x = b.node("Relu", [b.conv(b.node("Relu", [b.conv("image", 3, 8, stride=2)]), 8, 16, stride=2)])
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    v = b.node("Relu", [b.node("Gemm", ["meta", b.const(b.rng.normal(0, 0.3, (16, 16))), b.const(b.rng.normal(0, 0.1, 16))])])
    logits = b.node("Gemm", [b.node("Concat", [pooled, v], axis=1), b.const(b.rng.normal(0, 0.3, (32, 5))), b.const(b.rng.normal(0, 0.1, 5))])
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    return graph_model(b, [("image", [1, 3, 32, 32]), ("meta", [1, 16])], "logits")


def compiled_two_input_net(folder: Path, samples: int = 8) -> tuple[Path, Path]:
    """:func:`image_and_vector_net` with random samples in a .npz, compiled for --task fidelity in
    ``folder``: (compile folder, the .npz)."""
    import onnx

    rng = np.random.default_rng(0)
    onnx.save(image_and_vector_net(), folder / "two.onnx")
    np.savez(folder / "two.npz", image=rng.normal(size=(samples, 3, 32, 32)).astype(np.float32),
             meta=rng.normal(size=(samples, 16)).astype(np.float32))
    proc = run_cli("compile", folder / "two.onnx", "--calib", folder / "two.npz", "--out", folder / "out", "--task", "fidelity")
    assert proc.returncode == 0, proc.stderr[-1500:]
    return folder / "out", folder / "two.npz"


def residual_net(batch="N", size: int = 32):
    """Conv+BN+ReLU6 stem, depthwise+BN+ReLU6, residual Add+ReLU, classifier head; NCHW input."""
    g = GraphBuilder(1)
    x = g.relu6(g.bn(g.conv("input", 3, 8, 3, 2), 8))
    y = g.relu6(g.bn(g.conv(x, 8, 8, 3, 1, group=8), 8))
    y = g.bn(g.conv(y, 8, 8, 1, 1, 0), 8)
    z = g.node("Relu", [g.node("Add", [x, y])])
    return g.model([batch, 3, size, size], g.head(z, 8))


def nhwc_net(size: int = 32):
    """An NHWC input (tf2onnx-style): Transpose to NCHW, then conv layers."""
    g = GraphBuilder(2)
    t = g.node("Transpose", ["input"], perm=[0, 3, 1, 2])
    x = g.node("Relu", [g.conv(t, 3, 8, 3, 2)])
    x = g.node("Relu", [g.conv(x, 8, 16, 3, 1)])
    return g.model([1, size, size, 3], g.head(x, 16))


def two_output_net(size: int = 32):
    """Logits and, as a second output, a 4-D NCHW feature map (which onnx2tf computes in NHWC)."""
    g = GraphBuilder(4)
    x = g.relu6(g.conv("input", 3, 8, 3, 2))
    features = g.node("Sigmoid", [g.conv(x, 8, 4, 1, 1, 0)])
    return g.model([1, 3, size, size], g.head(x, 8), more_outputs=(features,))


def pad_conv_net(size: int = 32):
    """Explicit zero Pad feeding a stride-2 conv (PyTorch 'same' export style) and a symmetric one."""
    g = GraphBuilder(3)
    p = g.node("Pad", ["input", g.const([0, 0, 0, 0, 0, 0, 1, 1], "pads", np.int64)], mode="constant")
    x = g.relu6(g.conv(p, 3, 8, 3, 2, pad=0))
    p2 = g.node("Pad", [x, g.const([0, 0, 1, 1, 0, 0, 1, 1], "pads", np.int64)], mode="constant")
    x = g.relu6(g.conv(p2, 8, 8, 3, 1, pad=0))
    return g.model([1, 3, size, size], g.head(x, 8))


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """16 real photos (the shipped demo images) resized to 40 px for the tiny test nets."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("tiny_images")
    files = sorted(DEMO_IMAGES.glob("*.jpg"))[:16]
    for f in files:
        with Image.open(f) as im:
            im.convert("RGB").resize((40, 40)).save(folder / f.name)
    return folder


@pytest.fixture(scope="session")
def save_model(tmp_path_factory):
    import onnx

    folder = tmp_path_factory.mktemp("onnx")

    def _save(model, name: str) -> Path:
        path = folder / f"{name}.onnx"
        onnx.save(model, path)
        return path

    return _save


@pytest.fixture(scope="session")
def effnet_compiled(tmp_path_factory) -> Path:
    """The shipped EfficientNet-Lite0 compiled once (per-channel, 16 real calibration images)."""
    from quantune_edge import CompileOptions, compile_model, make_preprocessing

    out = tmp_path_factory.mktemp("effnet") / "out"
    prep = make_preprocessing(mean="127,127,127", std="128,128,128")
    compile_model(DEMO_MODEL, DEMO_IMAGES, out, CompileOptions(preprocessing=prep, num_calib=16))
    return out


@pytest.fixture(scope="session")
def nanodet_compiled(tmp_path_factory):
    """The shared NanoDet-m (six outputs; its int8 model makes XNNPACK fail to prepare) compiled once
    through the CLI on 8 COCO train images: (compile folder, the CLI's completed process)."""
    out = tmp_path_factory.mktemp("nanodet") / "out"
    proc = run_cli("compile", shared("detection/models/nanodet-m-320-coco.onnx"), "--calib", shared("detection/coco-train2017-128"),
                   "--out", out, "--num-calib", 8, "--channel-order", "bgr", "--mean", "103.53,116.28,123.675",
                   "--std", "57.375,57.12,58.395", "--resize-mode", "stretch", "--task", "detect",
                   "--decoder", f"{REPO / 'tests' / 'tasks' / 'nanodet_decoder.py'}:decode")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, proc


@pytest.fixture(scope="session")
def yolov5n_compiled(tmp_path_factory):
    """The shared YOLOv5n (one [1, 25200, 85] output, decode inside) compiled once through the CLI for
    the detect task, letterboxed, on 8 COCO train images: (compile folder, the CLI's completed process)."""
    out = tmp_path_factory.mktemp("yolov5n") / "out"
    proc = run_cli("compile", shared("detection/models/yolov5n-640-coco.onnx"), "--calib", shared("detection/coco-train2017-128"),
                   "--out", out, "--num-calib", 8, "--preset", "yolo", "--resize-mode", "letterbox", "--task", "detect")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, proc


def _emulated_board(suite: str):
    from quantune_edge.deploy import emulator
    from quantune_edge.errors import DeviceError
    from quantune_edge.testing.loopback_sshd import free_port

    try:
        emulator._require_host()
    except DeviceError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    before = emulator.status(suite=suite)
    state = before if before.running else emulator.up(free_port(), suite=suite, log=print)
    yield Path(state.target_file)
    if not before.running:
        emulator.down(suite=suite)


@pytest.fixture(scope="session")
def emulated_target():
    """The emulated Raspberry Pi (Debian bookworm, Python 3.11)'s target file. Built once per machine
    (debootstrap, a few minutes, cached in ~/.cache/quantune-edge/emulator). Outside CI it is skipped
    when the host cannot run it (not root, or qemu/debootstrap missing); in CI (CI=true) that is a
    failure, never a silent skip."""
    yield from _emulated_board("bookworm")


@pytest.fixture(scope="session")
def emulated_trixie():
    """The second emulated board, on today's Raspberry Pi OS base (Debian trixie, Python 3.13, cached
    in ~/.cache/quantune-edge/emulator-trixie), built and skipped or failed as ``emulated_target``."""
    yield from _emulated_board("trixie")


# ---------------------------------------------------------------- helpers several test modules use

CLI = [sys.executable, "-m", "quantune_edge.cli"]


def run_cli(*args, cwd=None):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


# A sitecustomize.py that hides both TFLite runtimes from every import finder: a Python without one.
HIDE_RUNTIMES = ("import sys\n\n\nclass _Hidden:\n    def find_spec(self, name, path=None, target=None):\n"
                 "        if name.split('.')[0] in ('tflite_runtime', 'ai_edge_litert'):\n"
                 "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n\n\n"
                 "sys.meta_path.insert(0, _Hidden())\n")


def blocked_runtime_env(tmp_path: Path) -> dict:
    """A Python on which neither TFLite runtime is installed, as far as it can tell: a device without a runtime."""
    blocked = tmp_path / "blocked"
    blocked.mkdir(parents=True, exist_ok=True)
    (blocked / "sitecustomize.py").write_text(HIDE_RUNTIMES)
    return dict(os.environ, PYTHONPATH=str(blocked))


def future_op_model(model: Path, out: Path, op: str | None = None, version: int = 99) -> Path:
    """A real model whose first op (or ``op``) claims ``version``: a valid flatbuffer (the host parses
    it), as a model from a newer converter is to an older device runtime; no runtime has version 99."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    from quantune_edge.model import tflite_graph

    m = schema.ModelT.InitFromPackedBuf(model.read_bytes(), 0)
    code = getattr(schema.BuiltinOperator, op) if op else None
    (chosen, *_) = [c for c in m.operatorCodes if code is None or tflite_graph.builtin_code(c) == code]
    chosen.version = version
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    out.write_bytes(bytes(builder.Output()))
    return out


def xnnpack_unpreparable(int8_model: Path, out: Path) -> Path:
    """A copy of an int8 model that XNNPACK refuses to prepare: the last LeakyReLU feeding only convs
    gets the scale 1.3e36 (what the converter once gave NanoDet-m's stem through a max pool padded with
    -3.4e38; the builtin kernels still run it)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    from quantune_edge.model import tflite_graph

    raw = int8_model.read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0))
    graph = model.subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

    def kind(op):
        return names[tflite_graph.builtin_code(model.operatorCodes[op.opcodeIndex])]

    def readers(t):
        return [op for op in graph.operators if t in list(op.inputs)]

    op = [op for op in graph.operators if kind(op) == "LEAKY_RELU" and all(kind(r) == "CONV_2D" for r in readers(op.outputs[0]))][-1]
    graph.tensors[op.outputs[0]].quantization.scale = np.asarray([1.3344405750530544e36], np.float32)
    builder = flatbuffers.Builder(len(raw))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    out.write_bytes(bytes(builder.Output()))
    return out
