import numpy as np
import pytest
from conftest import DEMO_IMAGES
from PIL import Image

from quantune_edge.common.inputs import InputSpec
from quantune_edge.common.preprocessing import PRESETS, Preprocessing, load_image, load_samples, make_preprocessing, select
from quantune_edge.errors import InputError
from quantune_edge.tasks.classification import Classification


def image(size: int) -> InputSpec:
    return InputSpec("input", "NCHW", (1, 3, size, size))


def test_presets_and_overrides():
    torch = make_preprocessing("torch")
    assert torch.mean == PRESETS["torch"][0] and torch.std == PRESETS["torch"][1] and torch.channel_order == "rgb"
    caffe = make_preprocessing("caffe")
    assert caffe.channel_order == "bgr" and caffe.std == (1.0, 1.0, 1.0)
    custom = make_preprocessing(mean="127", std="128,128,128")
    assert custom.mean == (127.0, 127.0, 127.0) and custom.std == (128.0,) * 3 and custom.preset is None
    filled = custom.with_input_size(224)
    assert filled.input_size == 224 and filled.resize == 256
    assert Preprocessing.from_dict(filled.to_dict()) == filled


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "bogus"}, "unknown preset"),
    ({"mean": "1,2"}, "one or three values"),
    ({"std": "1,0,1"}, "must not contain zero"),
    ({"mean": "a,b,c"}, "takes numbers"),
    ({"input_size": 224, "resize": 200}, "at least the shorter side of --input-size"),
    ({"input_size": "480x640", "resize": 400}, r"at least the shorter side of --input-size \(480\)"),
    ({"input_size": "48x"}, "positive S or HxW"), ({"input_size": "0x4"}, "positive S or HxW"), ({"input_size": "4x4x4"}, "positive S or HxW"),
    ({"channel_order": "gbr"}, "rgb or bgr"),
])
def test_bad_preprocessing_options(kwargs, message):
    with pytest.raises(InputError, match=message):
        make_preprocessing(**kwargs)


def test_a_non_square_input_size_is_height_by_width():
    prep = make_preprocessing(input_size="48x64", resize_mode="letterbox")
    assert prep.input_hw == (48, 64) and prep.with_input_size(10, 10).input_hw == (48, 64)  # given wins over the model's
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    filled = make_preprocessing().with_input_size(48, 64)
    assert filled.input_hw == (48, 64) and filled.resize == round(48 / 0.875)  # the shorter side
    assert make_preprocessing(input_size=224).input_hw == (224, 224) and make_preprocessing(input_size="224").input_width is None


def test_load_image_matches_hand_computation(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    prep = make_preprocessing(mean="10,20,30", std="2,4,8", input_size=48, resize=60)
    got = load_image(tmp_path / "x.png", prep)
    # shorter side already 60: no resize; center crop 48 from 60x80 -> rows 6:54, cols 16:64
    crop = pixels[6:54, 16:64].astype(np.float32)
    want = (crop - np.array([10, 20, 30], np.float32)) / np.array([2, 4, 8], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    bgr = load_image(tmp_path / "x.png", make_preprocessing(mean="10,20,30", std="2,4,8", input_size=48, resize=60, channel_order="bgr"))
    np.testing.assert_allclose(bgr, (crop[..., ::-1] - np.array([10, 20, 30], np.float32)) / np.array([2, 4, 8], np.float32), rtol=1e-6)


def test_grayscale_and_rgba_images_are_converted(tmp_path):
    Image.fromarray(np.full((50, 50), 200, np.uint8), "L").save(tmp_path / "g.png")
    Image.fromarray(np.full((50, 50, 4), 100, np.uint8), "RGBA").save(tmp_path / "a.png")
    samples = load_samples(tmp_path, make_preprocessing("raw"), [image(32)])
    assert samples.data.shape == (2, 32, 32, 3)
    assert set(np.unique(samples.data)) == {100.0, 200.0}


def test_folder_selection_is_deterministic_and_labels_are_read():
    prep = make_preprocessing("tf")
    a = load_samples(DEMO_IMAGES, prep, [image(64)], num=5, seed=3, labels=Classification().read_labels)
    b = load_samples(DEMO_IMAGES, prep, [image(64)], num=5, seed=3, labels=Classification().read_labels)
    assert a.names == b.names and np.array_equal(a.data, b.data)
    assert a.has_labels and np.all(a.labels >= 0)
    assert a.onnx_feeds([image(64)])[0]["input"].shape == (1, 3, 64, 64)
    assert sorted(select(10, None)) == list(range(10)) and len(select(10, 4)) == 4


def test_npy_in_model_layout(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    s = load_samples(tmp_path / "x.npy", make_preprocessing(), [image(8)], num=4)
    assert s.data.shape == (4, 8, 8, 3) and not s.has_labels
    idx = [int(n.split("[")[1].rstrip("]")) for n in s.names]
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in s.onnx_feeds([image(8)])]), data[idx])


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p / "x.npy", np.zeros((2, 8, 8, 3), np.float32)), r"has shape \(2, 8, 8, 3\); the model input 'input' \(NCHW\) needs \(N, 3, 8, 8\)"),
    (lambda p: np.save(p / "x.npy", np.zeros((0, 3, 8, 8), np.float32)), "holds no samples"),
    (lambda p: np.save(p / "x.npy", np.full((1, 3, 8, 8), np.nan, np.float32)), "NaN or Inf"),
    (lambda p: (p / "x.npy").write_bytes(b"not numpy"), "cannot read"),
])
def test_bad_npy(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(InputError, match=message):
        load_samples(tmp_path / "x.npy", make_preprocessing(), [image(8)])


def test_unreadable_images_are_skipped_and_all_unreadable_is_an_error(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InputError, match="none of the 1 calibration images"):
        load_samples(tmp_path, make_preprocessing(), [image(32)])
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "good.jpg")
    s = load_samples(tmp_path, make_preprocessing(), [image(32)])
    assert len(s) == 1 and len(s.skipped) == 1 and s.skipped[0].startswith("bad.jpg")


def test_empty_folder_and_bad_labels(tmp_path):
    with pytest.raises(InputError, match="no images"):
        load_samples(tmp_path, make_preprocessing(), [image(32)])
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "labels.csv").write_text("name,label\na.jpg,1\n")
    assert load_samples(tmp_path, make_preprocessing(), [image(32)]).labels.tolist() == [-1]  # no task: unlabelled
    with pytest.raises(InputError, match="file,class_index"):
        load_samples(tmp_path, make_preprocessing(), [image(32)], labels=Classification().read_labels)
