"""Segmentation models in result records and ``lineside score``: regions of ``defect_masks`` → boxes
in the item's own pixels (known answer, busbars left out), the class-index PNGs of ``--masks`` with
``classes.json``, coloured overlays, the station records, the metadata that names the mask classes,
and the clear error for ``--masks`` on a model without masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lineside.export.checkpoint import LoadedModel
from lineside.fusion.fusion_transformer import FusionTransformer
from lineside.fusion.model import InspectionModel
from lineside.fusion.segmentation_head import SegmentationHead
from lineside.runtime.backend import Backend
from lineside.runtime.detections import MaskLayout, class_index_map
from lineside.runtime.records import RecordBuilder, SegmentationField
from lineside.runtime.score import score
from lineside.runtime.torch_backend import TorchBackend
from lineside.vision.image_encoder import ImageEncoder
from lineside.vision.io import InputError
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EL_CRACKS = REPO.parent / "shared" / "data" / "el_cracks"
SIZE = 64
CLASSES = ["dark_area", "crossing", "crack", "busbar"]
INDEX_NAMES = {"0": "background", "1": "dark_area", "2": "crossing", "3": "crack", "4": "busbar"}


class _FakeBackend(Backend):
    """Metadata only: what RecordBuilder and score read before running anything."""

    name = "fake"

    def __init__(self, outputs: list[dict], masks: dict | None = None) -> None:
        super().__init__("<fake>")
        self.metadata = {"inputs": [{"name": "image", "dtype": "uint8", "shape": ["N", 1, SIZE, SIZE]}], "outputs": outputs,
                         "class_names": [], "preprocessing": {"input_size": [SIZE, SIZE], "train_size": [SIZE, SIZE]},
                         "masks": masks or {}}

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - never run here
        raise AssertionError("not run")


MASK_SPECS = [{"name": "defect_masks", "dtype": "float32", "shape": ["N", 4, 16, 16], "kind": "float"},
              {"name": "defect_heatmap", "dtype": "float32", "shape": ["N", 1, 16, 16], "kind": "float"}]
MASK_META = {"defect_masks": {"class_names": CLASSES, "structure_classes": ["busbar"], "stride": 4}}


def tiny_seg_loaded(crack_everywhere: bool = False) -> LoadedModel:
    torch.manual_seed(0)
    enc = ImageEncoder("test_efficientnet", 32, 1, feature_levels=[-1], pretrained=False, dense_levels=[1, 2, 3])
    head = SegmentationHead(32, enc.map_channels, 4, decoder_dim=16)
    if crack_everywhere:  # a known answer through the whole path: every cell is crack with p ≈ 0.9998
        with torch.no_grad():
            head.classifier.weight.zero_()
            head.classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0, 0.0]))
    model = InspectionModel(image_encoder=enc, fusion=FusionTransformer(32, 1, 2, dropout=0.0), heads={"segmentation": head})
    return LoadedModel(model.eval(), [], SIZE, 1, tasks=["segmentation"])


def _images(folder: Path, sizes=((80, 120), (64, 64), (150, 90))) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = folder / f"cell{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- known answers


def test_regions_become_boxes_in_the_items_pixels_and_busbars_stay_out():
    records = RecordBuilder(_FakeBackend(MASK_SPECS, MASK_META))
    assert "boxes" in records.has and records.mask_layout.class_names == tuple(CLASSES)
    masks = np.zeros((2, 4, 16, 16), np.float32)
    masks[1, 2, 4, 2:10] = 0.9  # a crack: cells row 4, columns 2..9 → [8, 16, 40, 20] in 64-px training pixels
    masks[1, 3, :, 0] = 1.0  # a busbar: structure, no box
    masks[1, 0, 12:14, 12:14] = 0.3  # under the mask threshold: no region
    out = {"defect_masks": masks, "defect_heatmap": np.zeros((2, 1, 16, 16), np.float32)}
    rec = records.record(out, 1, (200, 100))  # (H, W): x × 100/64, y × 200/64
    assert rec["boxes"] == [{"label": "crack", "score": 0.9, "box": [12.5, 50.0, 62.5, 62.5]}]
    assert "outputs" not in rec and rec["grade"] is None
    assert records.record(out, 0, (200, 100))["boxes"] == []
    # box threshold: a region scoring under it stays out
    strict = RecordBuilder(_FakeBackend(MASK_SPECS, MASK_META), box_threshold=0.95)
    assert strict.record(out, 1, (200, 100))["boxes"] == []


def test_class_index_map_upsamples_cells_to_the_image_by_nearest_neighbour():
    layout = MaskLayout.of(MASK_SPECS, {"preprocessing": {"train_size": [SIZE, SIZE]}, "masks": MASK_META})
    assert layout.index_names == {int(k): v for k, v in INDEX_NAMES.items()}
    masks = np.zeros((4, 16, 16), np.float32)
    masks[2, 0, 0] = 0.8  # crack in the top-left cell
    masks[3, 15, 15] = 0.4  # busbar 0.4 vs background 0.6: background
    masks[0, 15, 0] = 0.7  # dark area in the bottom-left cell
    idx = class_index_map(masks, layout, (32, 128))  # a cell = 2 rows × 8 columns of this image
    assert idx.shape == (32, 128) and idx.dtype == np.uint8
    assert (idx[:2, :8] == 3).all() and (idx[30:, :8] == 1).all()
    assert int((idx == 3).sum()) == 16 and int((idx == 1).sum()) == 16 and int((idx != 0).sum()) == 32


def test_older_metadata_falls_back_to_the_output_description():
    specs = [dict(MASK_SPECS[0], description="per-class probability at stride 4 of the 64x64 model input; "
                                           "channels dark_area, crossing, crack, busbar")]
    layout = MaskLayout.of(specs, {"preprocessing": {"train_size": [SIZE, SIZE]}})
    assert layout.class_names == tuple(CLASSES) and layout.stride == 4 and layout.structure_classes == ("busbar",)
    assert isinstance(RecordBuilder(_FakeBackend(specs)).fields[0], SegmentationField)


# --------------------------------------------------------------------------- lineside score


def test_score_writes_boxes_masks_and_classes(tmp_path):
    paths = _images(tmp_path / "in")
    from lineside.export.deployable import build_deployable

    loaded = tiny_seg_loaded(crack_everywhere=True)
    runner = TorchBackend(deployable=build_deployable(loaded), loaded=loaded)
    assert runner.metadata["masks"] == MASK_META
    out = tmp_path / "scores.csv"
    s = score(runner, str(tmp_path / "in"), out, overlays=tmp_path / "ov", masks=tmp_path / "masks", heatmaps=tmp_path / "hm",
              progress=False, num_workers=0)
    assert s.scored == 3 and s.errors == 0
    assert json.loads((tmp_path / "masks" / "classes.json").read_text()) == INDEX_NAMES
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.read_text().splitlines())}
    assert list(next(iter(rows.values()))) == ["path", "boxes", "heatmap", "mask", "error"]
    for p in paths:
        r = rows[p.name]
        h, w = np.asarray(Image.open(p)).shape
        boxes = json.loads(r["boxes"])
        assert [b["label"] for b in boxes] == ["crack"] and boxes[0]["box"] == [0.0, 0.0, float(w), float(h)]
        assert boxes[0]["score"] > 0.99
        mask = np.asarray(Image.open(r["mask"]))
        assert mask.shape == (h, w) and (mask == 3).all()
        assert Image.open(r["heatmap"]).size == (w, h)
        overlay = np.asarray(Image.open(tmp_path / "ov" / p.name).convert("RGB")).astype(int)
        assert (overlay[..., 0] - overlay[..., 1]).mean() > 100  # painted crack red
    # running again resumes: nothing rescored
    assert score(runner, str(tmp_path / "in"), out, masks=tmp_path / "masks", heatmaps=tmp_path / "hm", progress=False).skipped == 3


def test_score_real_cells_masks_within_class_indices(tmp_path):
    if not EL_CRACKS.is_dir():
        pytest.skip(f"{EL_CRACKS} is absent (real data sits beside the repo as ../shared)")
    from lineside.export.deployable import build_deployable

    paths = sorted((EL_CRACKS / "images").glob("*.jpg"))[:3]
    loaded = tiny_seg_loaded()
    runner = TorchBackend(deployable=build_deployable(loaded), loaded=loaded)
    out = tmp_path / "scores.csv"
    score(runner, [str(p) for p in paths], out, masks=tmp_path / "masks", progress=False, num_workers=0)
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 3 and not any(r["error"] for r in rows)
    for r in rows:
        w, h = Image.open(r["path"]).size
        mask = np.asarray(Image.open(r["mask"]))
        assert mask.shape == (h, w) and int(mask.max()) <= 4
        for b in json.loads(r["boxes"]):
            x1, y1, x2, y2 = b["box"]
            assert b["label"] in CLASSES[:3] and 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_masks_on_a_model_without_masks_is_a_clear_error(tmp_path):
    _images(tmp_path / "in", sizes=((64, 64),))
    grading = _FakeBackend([{"name": "grade_probs", "dtype": "float32", "shape": ["N", 2], "kind": "float"}])
    with pytest.raises(InputError, match="no defect_masks"):
        score(grading, str(tmp_path / "in"), tmp_path / "s.csv", masks=tmp_path / "m", progress=False)
    assert not (tmp_path / "s.csv").exists()


def test_cli_scores_an_onnx_export_with_masks(tmp_path):
    from lineside.export.onnx_export import export_onnx

    from lineside.cli.score import main

    r = export_onnx(tiny_seg_loaded(crack_everywhere=True), tmp_path / "export", batch_sizes=(1, 4), parity_images=0)
    assert r.metadata["masks"] == MASK_META
    _images(tmp_path / "in", sizes=((48, 72),))
    out = tmp_path / "scores.csv"
    assert main(["--model", str(r.path), "--input", str(tmp_path / "in"), "--out", str(out), "--masks", str(tmp_path / "m"),
                 "--no-progress"]) == 0
    row = next(csv.DictReader(out.read_text().splitlines()))
    assert json.loads(row["boxes"])[0]["box"] == [0.0, 0.0, 72.0, 48.0]
    assert np.asarray(Image.open(row["mask"])).shape == (48, 72) and Path(row["mask"]).parent == tmp_path / "m"
    assert json.loads((tmp_path / "m" / "classes.json").read_text()) == INDEX_NAMES


def test_station_records_carry_the_region_boxes(tmp_path):
    import io

    from lineside.export.deployable import build_deployable
    from lineside.runtime.sources import open_source
    from lineside.runtime.station import Station

    _images(tmp_path / "in", sizes=((80, 120), (64, 64)))
    loaded = tiny_seg_loaded(crack_everywhere=True)
    runner = TorchBackend(deployable=build_deployable(loaded), loaded=loaded)
    out = tmp_path / "r.jsonl"
    Station(runner, open_source(str(tmp_path / "in" / "*.png")), out, batch_max=4, latency_budget_ms=50, report_every=0,
            log=io.StringIO(), warmup=False).run()
    recs = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines()) if r.get("path")}
    assert recs["cell0.png"]["boxes"] == [{"label": "crack", "score": recs["cell0.png"]["boxes"][0]["score"], "box": [0.0, 0.0, 120.0, 80.0]}]
    assert recs["cell1.png"]["boxes"][0]["box"] == [0.0, 0.0, 64.0, 64.0]
    assert not any("defect_masks" in (r.get("outputs") or {}) for r in recs.values())
