"""One resize on every path: bit-exact to OpenCV INTER_LINEAR on uint8, identical bytes on the host and
inside exported graphs, and identical grades through ``score``, a 300x300 ONNX export and the station."""

from __future__ import annotations

import io
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest
import torch

from lineside.vision.preprocess import FramePreprocessor, frames_to_batch, resize_frame, resize_taps, resize_uint8

cv2 = pytest.importorskip("cv2")
OPENCV5 = int(cv2.__version__.split(".")[0]) >= 5
needs_opencv5 = pytest.mark.skipif(not OPENCV5, reason=f"bit-exactness is to OpenCV 5's INTER_LINEAR; this is OpenCV {cv2.__version__}")


def elpv_test_cells(n: int) -> list[str]:
    """``n`` cells spread over the ELPV test blocks (the split train.py holds out)."""
    try:
        from lineside.vision.elpv import elpv_records
    except ImportError:  # pragma: no cover
        pytest.skip("lineside.vision.elpv is not importable")
    try:
        records = elpv_records()
    except RuntimeError as exc:
        pytest.skip(f"ELPV cells unavailable: {exc}")
    from lineside.vision.splits import block_split

    idx = sorted(block_split([r.label for r in records], 60, 0.1, 0.2, 0)["test"])
    pick = np.linspace(0, len(idx) - 1, num=n).round().astype(int)
    return [records[idx[i]].path for i in pick]


def read_cells(paths: list[str], channels: int = 1) -> list[np.ndarray]:
    from lineside.vision.io import read_image

    return [read_image(p, channels) for p in paths]


def opencv(frame: np.ndarray, size) -> np.ndarray:
    out = cv2.resize(frame, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)
    return out if out.ndim == 3 else out[:, :, None]


# -- the resize itself ---------------------------------------------------------------------------


def test_taps_are_fixed_point_weights_on_half_pixel_centres():
    i0, i1, w0, w1 = resize_taps(300, 160)
    assert ((w0 + w1) == 2048).all() and w0.dtype == np.int32 and (i1 - i0 <= 1).all()
    pos = i0 + w1 / 2048.0  # source position of each output pixel
    assert np.abs(pos - ((np.arange(160) + 0.5) * 300 / 160 - 0.5)).max() <= 0.5 / 2048 + 1e-9
    i0, i1, w0, w1 = resize_taps(4, 9)  # upscale: edges clamp to the border pixel
    assert i0[0] == i1[0] == 0 and i0[-1] == i1[-1] == 3


@needs_opencv5
@pytest.mark.parametrize("size", [(160, 160), (224, 224), (64, 64), (150, 150), (413, 413), (97, 131), (300, 301), (37, 300)])
def test_resize_is_opencv_inter_linear_on_real_cells(size):
    cells = read_cells(elpv_test_cells(6))
    for cell in cells:
        assert cell.shape == (300, 300, 1)
        np.testing.assert_array_equal(resize_frame(cell, size), opencv(cell[:, :, 0], size))
    rgb = np.concatenate([cells[0], cells[1], cells[2]], axis=2)  # three channels, interleaved as OpenCV stores them
    np.testing.assert_array_equal(resize_frame(rgb, size), opencv(rgb, size))


@needs_opencv5
def test_resize_is_opencv_inter_linear_on_random_frames_and_sizes():
    rng = np.random.default_rng(0)
    for t in range(60):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 260, 4))
        channels = (1, 3)[t % 2]
        frame = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        if t % 3 == 0:  # smooth frames hit the rounding boundaries differently from noise
            frame = cv2.GaussianBlur(frame, (0, 0), 2.0).reshape(h, w, channels)
        np.testing.assert_array_equal(resize_frame(frame, (oh, ow)), opencv(frame, (oh, ow)), err_msg=f"{h}x{w}x{channels} -> {oh}x{ow}")
    for value in (0, 255):  # saturated frames stay saturated
        flat = np.full((300, 300, 1), value, np.uint8)
        assert (resize_frame(flat, (160, 160)) == value).all()


def test_every_host_path_gives_the_same_bytes():
    from lineside.vision.image_dataset import ScoringImageDataset
    from lineside.vision.transforms import build_eval_transform, build_train_transform

    paths = elpv_test_cells(4)
    cells = read_cells(paths)
    want = [resize_uint8(torch.from_numpy(c).permute(2, 0, 1), 160).numpy() for c in cells]
    for c, w in zip(cells, want):
        np.testing.assert_array_equal(build_eval_transform(160)(image=c)["image"].numpy(), w)
        np.testing.assert_array_equal(build_train_transform(160, "none")(image=c)["image"].numpy(), w)
        np.testing.assert_array_equal(resize_frame(c, 160).transpose(2, 0, 1), w)
        np.testing.assert_array_equal(FramePreprocessor(160)(torch.from_numpy(c).permute(2, 0, 1)[None])[0].numpy(), w.astype(np.float32))
    np.testing.assert_array_equal(frames_to_batch(cells, (160, 160)), np.stack(want))
    mixed = [cells[0], cells[1][:250, :280]]  # frames of different sizes
    np.testing.assert_array_equal(frames_to_batch(mixed, (160, 160))[0], want[0])
    ds = ScoringImageDataset(paths, 160, 1)
    for i, w in enumerate(want):
        np.testing.assert_array_equal(ds[i]["image"].numpy(), w)


def test_in_graph_resize_is_integer_and_bit_exact_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from lineside.export.trt_ops import unsupported_ops

    pre = FramePreprocessor((64, 64)).eval()
    example = torch.zeros(2, 1, 300, 300, dtype=torch.uint8)
    path = tmp_path / "resize.onnx"
    torch.onnx.export(pre, (example,), str(path), dynamo=True, input_names=["image"],
                      dynamic_shapes=({0: torch.export.Dim("N")},), optimize=True, verbose=False)
    graph = onnx.load(str(path))
    ops = {n.op_type for n in graph.graph.node}
    assert "Resize" not in ops and "Floor" not in ops and {"Gather", "Mul", "Add", "Div"} <= ops
    assert unsupported_ops(graph) == {}, "every node is one TensorRT's ONNX parser takes"
    cells = np.stack(read_cells(elpv_test_cells(8))).transpose(0, 3, 1, 2)
    rng = np.random.default_rng(1)
    frames = np.concatenate([cells, rng.integers(0, 256, (4, 1, 300, 300), dtype=np.uint8), np.full((1, 1, 300, 300), 255, np.uint8)])
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": frames})
    np.testing.assert_array_equal(got, frames_to_batch(list(frames.transpose(0, 2, 3, 1)), (64, 64)).astype(np.float32))
    np.testing.assert_array_equal(got, pre(torch.from_numpy(frames)).numpy())


# -- grades through score, a 300x300 export and the station ---------------------------------------


def _score_csv(model, paths, out) -> dict[str, tuple[int, np.ndarray]]:
    import csv

    from lineside.runtime.score import score

    score(model, paths, out, batch_size=16, num_workers=1, progress=False)
    rows = {}
    with open(out, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            assert not r["error"], r["error"]
            rows[r["path"]] = (int(r["grade"]), np.array([float(v) for k, v in r.items() if k.startswith("p_")]))
    return rows


def _station(backend, folder: Path, out: Path) -> dict[str, tuple[int, np.ndarray]]:
    import json

    from lineside.runtime.sources import open_source
    from lineside.runtime.station import Station

    Station(backend, open_source(str(folder / "*.png")), out, batch_max=16, latency_budget_ms=50, report_every=0,
            log=io.StringIO(), warmup=False).run()
    rows = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        assert r["error"] is None, r["error"]
        rows[Path(r["path"]).name] = (int(r["grade"]), np.array(list(r["probabilities"].values())))
    return rows


def test_grades_agree_through_score_a_300px_export_and_the_station(tmp_path, trained_elpv_ckpt):
    """A trained grader (a random one has nothing to flip) on 40 real test cells: the checkpoint scored
    at its training size (host resize), its ``--input-size 300x300`` ONNX export fed the raw cells
    (resize in the graph) and the station on that export and on the checkpoint give the same grades,
    with probabilities apart only by float kernels, not by a grey level."""
    from lineside.export.onnx_export import export_onnx
    from lineside.runtime.backend import load_backend
    from lineside.runtime.torch_backend import TorchBackend

    cells = elpv_test_cells(40)
    folder = tmp_path / "cells"
    folder.mkdir()
    for p in cells:  # the station reads a glob; the cells keep their bytes
        (folder / Path(p).name).symlink_to(p)
    paths = sorted(str(p) for p in folder.glob("*.png"))
    by_name = lambda rows: {Path(k).name: v for k, v in rows.items()}  # noqa: E731

    ckpt_rows = by_name(_score_csv(str(trained_elpv_ckpt), paths, tmp_path / "ckpt.csv"))
    onnx_path = export_onnx(str(trained_elpv_ckpt), tmp_path / "onnx300", input_size="300x300", batch_sizes=(1, 16),
                            parity_images=0).path
    onnx_backend = load_backend(onnx_path)
    assert onnx_backend.input_size == (300, 300)
    runs = {
        "score 300x300 onnx": by_name(_score_csv(str(onnx_path), paths, tmp_path / "onnx.csv")),
        "station 300x300 onnx": _station(onnx_backend, folder, tmp_path / "station_onnx.jsonl"),
        "station checkpoint": _station(TorchBackend(trained_elpv_ckpt), folder, tmp_path / "station_ckpt.jsonl"),
    }
    names = sorted(ckpt_rows)
    assert len(names) == 40
    grades = np.array([ckpt_rows[n][0] for n in names])
    probs = np.stack([ckpt_rows[n][1] for n in names])
    assert len(set(grades.tolist())) > 1 and probs.max(1).mean() > 0.5, "a trained model: more than one grade, confident"
    for run, rows in runs.items():
        assert sorted(rows) == names, run
        np.testing.assert_array_equal(np.array([rows[n][0] for n in names]), grades, err_msg=run)
        diff = np.abs(np.stack([rows[n][1] for n in names]) - probs).max()
        assert diff < 1e-4, f"{run}: grade probabilities differ by {diff:.2e} (a grey level apart gives ~1e-2)"

    # and the check can see the fault: a float in-graph resize (not rounded to whole grey levels, as
    # exported graphs once ran it) moves this model's probabilities by far more than the tolerance
    import torch.nn.functional as F

    from lineside.export.checkpoint import load_inspection_model
    from lineside.export.deployable import build_deployable

    d = build_deployable(load_inspection_model(trained_elpv_ckpt), (300, 300))
    d.preprocess.forward = lambda image: F.interpolate(image.float(), size=d.train_size, mode="bilinear", align_corners=False)
    raw = torch.from_numpy(np.ascontiguousarray(np.stack(read_cells([str(folder / n) for n in names])).transpose(0, 3, 1, 2)))
    float_probs = d.run(raw)["grade_probs"].numpy()
    assert np.abs(float_probs - probs).max() > 1e-3
