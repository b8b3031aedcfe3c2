"""Decision stability: the perturbations, and the share of changed grades for backends known to be stable or not."""

from __future__ import annotations

import json
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest

from lineside.runtime.backend import Backend
from lineside.runtime.stability import decision_stability, format_stability, grey_noise, jpeg_round_trip


class ParityBackend(Backend):
    """Grade 1 when the sum of the frame's grey levels is odd (flips on any odd change), or, with
    ``stable``, when the mean grey level is above 128 (frames far from it never flip)."""

    name = "parity"

    def __init__(self, stable: bool = False, size=(32, 32)) -> None:
        super().__init__("<parity>")
        self.stable = stable
        self.metadata = {
            "class_names": ["even", "odd"],
            "inputs": [{"name": "image", "dtype": "uint8", "shape": ["N", 1, *size]}],
            "outputs": [{"name": "grade_probs", "dtype": "float32", "shape": ["N", 2], "kind": "float"},
                        {"name": "grade", "dtype": "int64", "shape": ["N"], "kind": "decoded"}],
        }
        self.seen: list[tuple] = []

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        self.seen.append(image.shape)
        flat = image.reshape(len(image), -1).astype(np.int64)
        grade = (flat.mean(1) > 128).astype(np.int64) if self.stable else flat.sum(1) % 2
        probs = np.stack([1.0 - grade, grade.astype(float)], 1).astype(np.float32)
        return {"grade_probs": probs, "grade": grade}


def frames(n: int, seed: int = 0, size=(40, 48)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(30, 90, (n, 1, 1, 1)) + rng.integers(0, 20, (n, *size, 1))
    return [f.astype(np.uint8) for f in base]


def test_grey_noise_is_within_one_level_uniform_and_clipped():
    rng = np.random.default_rng(0)
    f = np.full((200, 200, 1), 128, np.uint8)
    d = grey_noise(f, rng).astype(int) - 128
    assert set(np.unique(d)) == {-1, 0, 1}
    assert all(abs((d == v).mean() - 1 / 3) < 0.01 for v in (-1, 0, 1))
    assert grey_noise(np.zeros((50, 50), np.uint8), rng).min() == 0 and grey_noise(np.full((50, 50), 255, np.uint8), rng).max() == 255


def test_jpeg_round_trip_keeps_shape_and_changes_a_little():
    rng = np.random.default_rng(0)
    grey = (np.add.outer(np.arange(64), np.arange(80)) % 200 + rng.integers(0, 8, (64, 80))).astype(np.uint8)[:, :, None]
    rgb = np.concatenate([grey, 255 - grey, grey // 2], axis=2)
    for f in (grey, rgb, grey[:, :, 0]):
        out = jpeg_round_trip(f, 95)
        diff = np.abs(out.astype(int) - f)
        assert out.shape == f.shape and out.dtype == np.uint8
        assert 0 < diff.mean() < 3, diff.mean()
    # channel order survives: the red plane comes back red
    assert np.abs(jpeg_round_trip(rgb, 95)[:, :, 1].astype(int) - rgb[:, :, 1]).mean() < 3


def test_stable_backend_never_changes_and_a_fragile_one_often_does():
    cells = frames(120)
    stable = ParityBackend(stable=True)
    rows = decision_stability(stable, cells, batch_size=50)
    assert [r.perturbation for r in rows] == ["noise ±1", "jpeg q95"]
    assert all(r.n == 120 and r.changed == 0 and r.share == 0.0 and r.max_prob_change == 0.0 for r in rows)
    assert set(stable.seen) == {(50, 1, 32, 32), (20, 1, 32, 32)}, "frames are resized to the backend's input size, in batches"
    fragile = decision_stability(ParityBackend(), cells, perturbations=["noise ±1"], seed=3)
    (row,) = fragile
    assert 0.3 < row.share < 0.7 and row.changed == round(row.share * 120) and row.max_prob_change == 1.0
    again = decision_stability(ParityBackend(), cells, perturbations=["noise ±1"], seed=3)
    assert again[0].changed == row.changed, "seeded"
    table = format_stability(rows + fragile, "parity", "synthetic")
    assert "| noise ±1 | 120 | 0 | **0.00%** |" in table and f"| {row.changed} |" in table


def test_needs_a_grading_model_and_known_perturbations():
    b = ParityBackend()
    with pytest.raises(ValueError, match="unknown perturbation"):
        decision_stability(b, frames(2), perturbations=["blur"])
    with pytest.raises(ValueError, match="no frames"):
        decision_stability(b, [])
    b.metadata["outputs"] = b.metadata["outputs"][:1]
    with pytest.raises(ValueError, match="grading model"):
        decision_stability(b, frames(2))


def test_bench_stability_flag_on_a_folder(tmp_path, capsys):
    from PIL import Image

    from lineside.cli.bench import main

    for i, f in enumerate(frames(6, size=(70, 60))):
        Image.fromarray(f[:, :, 0]).save(tmp_path / f"c{i}.png")
    ckpt = os.path.join(os.path.dirname(__file__), "data", "pre_namespace_tiny.ckpt")
    out = tmp_path / "s.json"
    assert main(["--model", ckpt, "--stability", "--calib", str(tmp_path), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "decision stability of " in text and "| noise ±1 | 6 |" in text and "| jpeg q95 | 6 |" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["perturbation"] for r in rows] == ["noise ±1", "jpeg q95"] and all(r["n"] == 6 for r in rows)


def test_camera_augmentation_perturbs_the_raw_frame_before_the_resize():
    import albumentations as A

    from lineside.vision.transforms import FrameResize, GreyLevelNoise, build_train_transform

    ops = list(build_train_transform(64, "camera").transforms)
    kinds = [type(t) for t in ops]
    assert kinds.index(GreyLevelNoise) < kinds.index(FrameResize) and kinds.index(A.ImageCompression) < kinds.index(FrameResize)
    assert [type(t) for t in build_train_transform(64, "inspection").transforms] == kinds[2:], "then exactly the inspection pipeline"
    f = np.full((80, 80, 1), 128, np.uint8)
    for levels in (1, 2):
        d = GreyLevelNoise((levels, levels), p=1.0)(image=f)["image"].astype(int) - 128
        assert d.shape == f.shape and set(np.unique(d)) == set(range(-levels, levels + 1))
    assert GreyLevelNoise((2, 2), p=1.0)(image=np.zeros((20, 20, 1), np.uint8))["image"].min() == 0
