"""PatchMemory: anomaly scores from good images only, on real ELPV cells (installed package)."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from lineside.vision.elpv import elpv_records
from lineside.cli.patch_memory import main
from lineside.vision.patch_memory import PatchMemory, PatchMemoryError
from lineside.vision.patch_memory_scoring import image_batches

SIZE = 160  # small for speed; the recipe uses ELPV's native 300 px


def _ok_mono_cells(n):
    cells = [r.path for r in elpv_records() if r.label == 0 and r.text == "monocrystalline"]
    return [np.asarray(Image.open(p).convert("L").resize((SIZE, SIZE))) for p in cells[:: max(1, len(cells) // n)][:n]]


def _batch(arrays):
    return torch.from_numpy(np.stack(arrays))[:, None]


@pytest.fixture(scope="module")
def fitted():
    cells = _ok_mono_cells(13)
    memory = PatchMemory(image_size=SIZE, max_patches=1000).fit([_batch(cells[:12])])
    return memory, cells[12]


def test_a_drawn_crack_scores_above_the_clean_cell_and_is_located(fitted):
    memory, clean = fitted
    cracked = clean.copy()
    cracked[40:120, 100:102] = 20  # a thin dark vertical crack, 2 px wide
    out = memory(_batch([clean, cracked]))
    assert out.heatmap.shape == (2, SIZE // 16, SIZE // 16)
    assert torch.isfinite(out.heatmap).all()
    assert out.score[1] > 1.2 * out.score[0]
    hot = np.unravel_index(int(out.heatmap[1].argmax()), out.heatmap.shape[1:])
    assert 2 <= hot[0] <= 7 and 5 <= hot[1] <= 7  # the crack's cells on the 10x10 grid (rows 2.5-7.5, col 6.3)


def test_memory_is_capped_seeded_and_fit_on_good_images_only(fitted):
    memory, _ = fitted
    assert memory.memory.shape == (1000, memory.dim)
    again = PatchMemory(image_size=SIZE, max_patches=1000).fit([_batch(_ok_mono_cells(13)[:12])])
    assert torch.equal(again.memory, memory.memory)
    with pytest.raises(PatchMemoryError, match="empty"):
        PatchMemory(image_size=SIZE)(_batch(_ok_mono_cells(1)))
    with pytest.raises(PatchMemoryError, match="no good images"):
        PatchMemory(image_size=SIZE).fit([])


def test_save_load_round_trip_and_bad_files(fitted, tmp_path):
    memory, clean = fitted
    memory.calibrate([_batch([clean])], quantile=0.5)
    path = memory.save(tmp_path / "m.pt")
    back = PatchMemory.load(path)
    assert torch.equal(back.threshold, memory.threshold)
    torch.testing.assert_close(back(_batch([clean])).score, memory(_batch([clean])).score)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(PatchMemoryError, match="other.pt: not a lineside patch memory"):
        PatchMemory.load(tmp_path / "other.pt")
    with pytest.raises(PatchMemoryError, match="missing.pt: memory file not found"):
        PatchMemory.load(tmp_path / "missing.pt")


def test_cli_fit_and_score_a_folder_with_a_corrupt_file(tmp_path, caplog):
    good, mixed = tmp_path / "good", tmp_path / "line"
    good.mkdir(), mixed.mkdir()
    cells = _ok_mono_cells(10)
    for i, c in enumerate(cells[:8]):
        Image.fromarray(c).save(good / f"ok{i}.png")
    (good / "broken.png").write_bytes(b"not a png")
    cracked = cells[8].copy()
    cracked[30:130, 80:82] = 20
    Image.fromarray(cells[8]).save(mixed / "a_clean.png")
    Image.fromarray(cracked).save(mixed / "b_cracked.png")
    (mixed / "c_empty.png").write_bytes(b"")
    mem = tmp_path / "memory.pt"
    args = ["--image-size", str(SIZE), "--max-patches", "3000", "--num-workers", "0"]
    assert main(["fit", "--input", str(good), "--out", str(mem), "--calib-fraction", "0.25", *args]) == 0
    assert any("broken.png" in r.getMessage() for r in caplog.records)  # skipped with its name, the fit went on
    assert np.isfinite(float(PatchMemory.load(mem).threshold))
    out = tmp_path / "scores.csv"
    over = tmp_path / "overlays"
    assert main(["score", "--memory", str(mem), "--input", str(mixed), "--output", str(out), "--overlays", str(over), "--num-workers", "0"]) == 0
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"a_clean.png", "b_cracked.png", "c_empty.png"}
    assert "empty" in rows["c_empty.png"]["error"] and rows["c_empty.png"]["anomaly_score"] == ""
    assert float(rows["b_cracked.png"]["anomaly_score"]) > float(rows["a_clean.png"]["anomaly_score"])
    assert rows["b_cracked.png"]["anomalous"] == "1"
    pngs = sorted(p.name for p in over.glob("*.png"))
    assert len(pngs) == 2 and pngs[1].endswith("b_cracked.png")  # no overlay for the unreadable file
    red = np.asarray(Image.open(over / pngs[1])).astype(int)
    crack_red = (red[30:130, 70:92, 0] - red[30:130, 70:92, 1]).mean()
    far_red = (red[:, :20, 0] - red[:, :20, 1]).mean()
    assert crack_red > far_red + 20  # the heatmap is hottest on the crack


def test_fit_refuses_a_labelled_manifest_without_good_label(tmp_path):
    cell = tmp_path / "c.png"
    Image.fromarray(_ok_mono_cells(1)[0]).save(cell)
    (tmp_path / "m.csv").write_text("path,label\nc.png,ok\nc.png,crack\n")
    with pytest.raises(SystemExit, match="--good-label"):
        main(["fit", "--input", str(tmp_path / "m.csv"), "--out", str(tmp_path / "mem.pt")])


def test_image_batches_resize_any_size_and_keep_paths(tmp_path):
    a = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 70, 3), np.uint8)).save(a)
    images, errors, paths = next(image_batches([str(a), str(tmp_path / "gone.png")], channels=1, size=32))
    assert images.shape == (2, 1, 32, 32) and images.dtype == torch.uint8
    assert errors[0] == "" and "file not found" in errors[1] and paths[1].endswith("gone.png")


def test_auroc_reads_distances_as_scores_not_logits():
    from lineside.vision.patch_memory_scoring import anomaly_auroc as _auroc

    scores = np.array([3.0, 4.0, 20.0, 25.0, 30.0])  # distances, far outside 0..1
    assert _auroc(scores, np.array([0, 0, 1, 1, 1], bool)) == pytest.approx(1.0)
    assert _auroc(scores, np.array([1, 0, 0, 0, 1], bool)) == pytest.approx(0.5)
    assert np.isnan(_auroc(scores, np.zeros(5, bool)))
