"""A plug-in decoder (``--decoder tests/tasks/nanodet_decoder.py:decode``) for the shared NanoDet-m
320 export, written against ONNX Runtime's outputs as a user would write it: six outputs,
cls_s8/16/32 [N, 80] (sigmoided) and reg_s8/16/32 [N, 32] (4 sides x 8 GFL bins)."""
import numpy as np

SIZE = 320
BINS = 8


def decode(outputs):
    boxes, scores, classes = [], [], []
    for stride in (8, 16, 32):
        cls = outputs[f"cls_s{stride}"]
        reg = outputs[f"reg_s{stride}"].reshape(-1, 4, BINS)
        side = SIZE // stride
        ys, xs = np.divmod(np.arange(side * side), side)
        cx, cy = (xs + 0.5) * stride, (ys + 0.5) * stride
        e = np.exp(reg - reg.max(axis=2, keepdims=True))
        distance = (e / e.sum(axis=2, keepdims=True)) @ np.arange(BINS, dtype=np.float32) * stride  # [N, 4]: l t r b
        xyxy = np.stack([cx - distance[:, 0], cy - distance[:, 1], cx + distance[:, 2], cy + distance[:, 3]], axis=1)
        i, c = np.nonzero(cls > 0.001)
        boxes.append(xyxy[i])
        scores.append(cls[i, c])
        classes.append(c)
    return np.concatenate(boxes), np.concatenate(scores), np.concatenate(classes)
