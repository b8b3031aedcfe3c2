"""Whole-module EL frames (``--tile cells``): the cell grid found on warped modules built from real ELPV
cells, cells cut from a module graded as the original cells, boxes mapped back to module pixels,
clear errors for images without a module, and ``lineside score`` / the station taking modules."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("elpv_dataset", reason="module images are built from ELPV cells (pip install elpv-dataset)")
pytest.importorskip("cv2", reason="the module grid uses OpenCV")

from lineside.vision.module_grid import ModuleGridError, find_module_grid, parse_grid
from lineside.vision.module_synth import synth_module


@pytest.mark.parametrize("rows,cols,half,cell_px,seed", [(6, 10, False, 80, 1), (6, 12, False, 90, 2), (12, 12, True, 90, 3),
                                                         (6, 10, False, 100, 7)])
def test_grid_is_found_on_warped_modules_of_real_cells(rows, cols, half, cell_px, seed):
    m = synth_module(rows, cols, cell_px=cell_px, half=half, warp=0.05, rotate_deg=4, noise=4, seed=seed)
    grid = find_module_grid(m.image)
    assert (grid.rows, grid.cols) == (rows, cols)
    err = np.linalg.norm(grid.nodes() - m.nodes, axis=-1)
    assert err.mean() < 1.5 and err.max() < 4.0, f"grid crossings off by {err.mean():.2f} px on average, {err.max():.2f} at most"
    # the cell quads and the crops agree with the grid: crops are about a cell each, row by row
    crops = grid.cut(grid.rectify(m.image[..., None]))
    assert len(crops) == rows * cols
    sizes = np.array([c.shape[:2] for c in crops])
    assert np.ptp(sizes[:, 0]) <= 2 and np.ptp(sizes[:, 1]) <= 2
    pitch = np.array(m.cell_px) + m.gap_px  # a crop runs gap centre to gap centre; one view fixes its aspect within perspective
    assert abs((sizes[0, 1] / sizes[0, 0]) / (pitch[1] / pitch[0]) - 1) < 0.1


def test_a_grid_hint_fixes_the_counts_in_either_orientation():
    m = synth_module(6, 10, cell_px=80, seed=11)
    for hint in ("6x10", "10x6", (6, 10)):
        grid = find_module_grid(m.image, hint)
        assert (grid.rows, grid.cols) == (6, 10)
    assert parse_grid("auto") is None and parse_grid(" 12 x 12 ") == (12, 12)
    for bad in ("6", "6x", "0x10", "1x1"):
        with pytest.raises(ValueError):
            parse_grid(bad)


def test_images_without_a_module_give_an_error_naming_the_file():
    from lineside.vision.elpv import elpv_records
    from lineside.vision.io import read_image

    rng = np.random.default_rng(0)
    cases = {
        "noise.png": rng.integers(0, 255, (400, 600), dtype=np.uint8),
        "flat.png": np.full((400, 600), 90, np.uint8),
        "one_cell.png": read_image(elpv_records()[0].path, 1)[..., 0],
    }
    for name, image in cases.items():
        with pytest.raises(ModuleGridError, match=name):
            find_module_grid(image, path=name)


class _BoxBackend:
    """A stand-in backend: a grade per cell and one box in the middle of every cell, for the mapping."""

    input_size = (64, 64)
    channels = 1
    class_names = ["ok", "mild", "moderate", "severe"]
    metadata = {"box_class_names": ["crack"]}
    output_specs = [{"name": "grade_probs", "kind": "float", "shape": [-1, 4]}, {"name": "boxes", "kind": "box", "shape": [-1, 1, 4]},
                    {"name": "box_scores", "kind": "box_score", "shape": [-1, 1]}, {"name": "box_labels", "kind": "box_label", "shape": [-1, 1]}]
    output_names = [s["name"] for s in output_specs]
    takes_image, takes_points, name = True, False, "stand-in"

    def __call__(self, frames: np.ndarray) -> dict:
        n = len(frames)
        self.batches = getattr(self, "batches", []) + [n]
        probs = np.tile([0.7, 0.1, 0.1, 0.1], (n, 1)).astype(np.float32)
        probs[0] = [0.1, 0.1, 0.1, 0.7]  # the first cell of the batch: severe
        return {"grade_probs": probs, "boxes": np.tile([[[16.0, 16.0, 48.0, 48.0]]], (n, 1, 1)).astype(np.float32),
                "box_scores": np.full((n, 1), 0.9, np.float32), "box_labels": np.zeros((n, 1), np.int64)}

    def describe(self) -> str:
        return "stand-in"


def test_cells_are_scored_as_one_batch_and_boxes_map_back_to_module_pixels():
    from lineside.runtime.module_score import ModuleTiler
    from lineside.runtime.records import RecordBuilder

    m = synth_module(6, 10, cell_px=80, warp=0.05, seed=5)
    backend = _BoxBackend()
    result = ModuleTiler().score(backend, RecordBuilder(backend), [m.image[..., None]], ["m.png"])[0]
    assert backend.batches == [60]
    rec = result.record
    assert rec["grid"]["rows"] == 6 and rec["grid"]["cols"] == 10 and len(rec["cells"]) == 60
    assert rec["grade"] == 3 and rec["decision"] == "severe" and rec["grade_counts"] == {"ok": 59, "mild": 0, "moderate": 0, "severe": 1}
    assert (rec["cells"][0]["row"], rec["cells"][0]["col"], rec["cells"][0]["grade"]) == (0, 0, 3)
    assert len(rec["boxes"]) == 60
    for cell in rec["cells"]:
        truth = m.cell_quads[cell["row"], cell["col"]]
        (box,) = cell["boxes"]
        centre = np.mean(box["quad"], axis=0)  # the middle half of the cell, in module-image px
        assert np.linalg.norm(centre - truth.mean(axis=0)) < 2.0
        x1, _, x2, _ = box["box"]
        assert abs((x2 - x1) - 0.5 * np.ptp(truth[:, 0])) < 0.1 * np.ptp(truth[:, 0])
    assert json.dumps(rec)  # the record is plain JSON


def _write_modules(folder: Path, n: int, cell_px: int = 120, seed: int = 20) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    mods = []
    for i in range(n):
        m = synth_module(6, 10, cell_px=cell_px, warp=0.04, noise=2.0, seed=seed + i)
        Image.fromarray(m.image).save(folder / f"module_{i}.png")
        mods.append(m)
    return mods


def _truth_cells(m) -> list:
    """The cells of a synthetic module cut with the true grid: the image warped back to the flat layout
    through the true homography, cut gap centre to gap centre."""
    import cv2

    h, w = m.meta["flat_size"]
    flat = cv2.warpPerspective(m.image, np.linalg.inv(m.homography), (w, h), flags=cv2.INTER_LINEAR)
    xs, ys = np.rint(m.meta["flat_xs"]).astype(int), np.rint(m.meta["flat_ys"]).astype(int)
    return [flat[ys[r]: ys[r + 1], xs[c]: xs[c + 1], None] for r in range(m.rows) for c in range(m.cols)]


def test_cells_cut_from_a_module_grade_as_the_truly_cut_cells(trained_elpv_ckpt):
    """The trained fixture model grades the cells cut along the found grid as the cells cut along the true
    grid. (Against the original 300-px ELPV files this small model is no reference: it changes the grade
    of about a fifth of cells shifted by 3 px; see the next test and docs/modules.md.)"""
    from lineside.runtime.module_score import ModuleTiler
    from lineside.runtime.records import RecordBuilder
    from lineside.runtime.torch_backend import TorchBackend
    from lineside.vision.preprocess import frames_to_batch

    backend = TorchBackend(trained_elpv_ckpt)
    mods = [synth_module(6, 10, cell_px=120, warp=0.04, noise=2.0, seed=30 + i) for i in range(2)]
    results = ModuleTiler().score(backend, RecordBuilder(backend), [m.image[..., None] for m in mods], ["a.png", "b.png"])
    same, margin = [], []
    for m, res in zip(mods, results):
        truth = backend(frames_to_batch(_truth_cells(m), backend.input_size))["grade_probs"]
        tiled = np.array([c["grade"] for c in res.record["cells"]])
        assert len(set(truth.argmax(1).tolist())) > 1, "a trained model grades cells differently"
        top2 = np.sort(truth, axis=1)[:, -2:]
        same += (tiled == truth.argmax(1)).tolist()
        margin += (top2[:, 1] - top2[:, 0]).tolist()
    same, margin = np.array(same), np.array(margin)
    clear = margin >= 0.2  # this small model leaves half the cells within 0.1 of a tie, which any resampling flips
    assert clear.sum() >= 20
    assert same[clear].mean() >= 0.9, f"cells with a clear grade: {same[clear].sum()}/{clear.sum()} agree"
    assert same.mean() >= 0.75, f"all cells: {same.sum()}/{len(same)} agree"


QUICKSTART = Path(__file__).resolve().parents[1] / "runs" / "quickstart" / "checkpoints" / "best.ckpt"


@pytest.mark.slow
@pytest.mark.skipif(not QUICKSTART.is_file(), reason=f"{QUICKSTART} is absent (make quickstart trains it)")
def test_module_cells_grade_as_the_original_cells_with_the_quickstart_model():
    from lineside.runtime.module_score import ModuleTiler
    from lineside.runtime.records import RecordBuilder
    from lineside.runtime.torch_backend import TorchBackend
    from lineside.vision.elpv import elpv_records
    from lineside.vision.io import read_image
    from lineside.vision.preprocess import frames_to_batch

    backend = TorchBackend(QUICKSTART)
    records = elpv_records()
    agree = total = 0
    for seed in (50, 51):
        m = synth_module(6, 10, cell_px=300, warp=0.03, noise=2.0, seed=seed)
        res = ModuleTiler("6x10").score(backend, RecordBuilder(backend), [m.image[..., None]], ["m.png"])[0]
        direct = backend(frames_to_batch([read_image(records[i].path, 1) for i in m.cells.ravel()], backend.input_size))
        agree += int((np.array([c["grade"] for c in res.record["cells"]]) == direct["grade_probs"].argmax(1)).sum())
        total += m.rows * m.cols
    assert agree / total >= 0.85, f"module cells agree with the original ELPV cells on {agree}/{total}"


def test_score_and_station_take_module_images_with_tile_cells(trained_elpv_ckpt, tmp_path):
    from lineside.runtime.sources import open_source
    from lineside.runtime.station import Station
    from lineside.runtime.torch_backend import TorchBackend

    from lineside.cli.score import build_parser as score_parser
    from lineside.cli.score import main as score_main
    from lineside.cli.station import build_parser as station_parser

    folder = tmp_path / "modules"
    mods = _write_modules(folder, 2, cell_px=90)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400), dtype=np.uint8)).save(folder / "not_a_module.png")
    out = tmp_path / "modules.csv"
    assert score_main(["--model", str(trained_elpv_ckpt), "--input", str(folder), "--output", str(out), "--backend", "torch",
                       "--tile", "cells", "--overlays", str(tmp_path / "ov"), "--no-progress"]) == 0
    with open(out, newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert set(rows) == {"module_0.png", "module_1.png", "not_a_module.png"}
    assert "not_a_module.png" in rows["not_a_module.png"]["error"] and "no cell grid" in rows["not_a_module.png"]["error"]
    for i, m in enumerate(mods):
        r = rows[f"module_{i}.png"]
        assert r["error"] == "" and (int(r["rows"]), int(r["cols"])) == (6, 10)
        grades = np.array(json.loads(r["grades"]))
        cells = json.loads(r["cells"])
        assert grades.shape == (6, 10) and int(r["grade"]) == grades.max() and len(cells) == 60
        quads = np.array([c["quad"] for c in cells]).reshape(6, 10, 4, 2)
        assert np.abs(quads.mean(axis=2) - m.cell_quads.mean(axis=2)).max() < 3.0  # cell centres in module px
        assert (tmp_path / "ov" / f"module_{i}.png").is_file()
    assert not (tmp_path / "ov" / "not_a_module.png").exists()

    jsonl = tmp_path / "station.jsonl"
    Station(TorchBackend(trained_elpv_ckpt), open_source(str(folder / "*.png")), jsonl, batch_max=4, latency_budget_ms=50,
            report_every=0, log=io.StringIO(), warmup=False, tile="cells").run()
    records = {Path(r["path"]).name: r for r in map(json.loads, jsonl.read_text(encoding="utf-8").splitlines())}
    assert "not_a_module.png" in records["not_a_module.png"]["error"]
    for i in range(2):
        rec = records[f"module_{i}.png"]
        assert rec["error"] is None and len(rec["cells"]) == 60 and rec["grid"]["rows"] == 6
        assert np.array_equal(np.array([c["grade"] for c in rec["cells"]]).reshape(6, 10), np.array(json.loads(rows[f"module_{i}.png"]["grades"])))
    a = station_parser().parse_args(["--model", "m.onnx", "--source", "d", "--out", "r.jsonl", "--tile", "cells", "--grid", "6x12"])
    assert (a.tile, a.grid) == ("cells", "6x12")
    assert score_parser().parse_args(["--model", "m", "--input", "d", "--out", "r.csv", "--tile", "cells"]).tile == "cells"
    with pytest.raises(SystemExit):
        score_parser().parse_args(["--model", "m", "--input", "d", "--out", "r.csv", "--tile", "cells", "--grid", "6by10"])
