"""Box/mask readers, the detection dataset, its pipelines, collate and splits (vision/box_*.py,
vision/detection_data.py): hand-written files in tmp_path, plus real-data smoke tests on ../shared."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from lineside.vision.box_formats import (
    DEEPPCB_CLASSES,
    MAGNETIC_TILE_CLASSES,
    NEU_DET_CLASSES,
    read_coco,
    read_deeppcb,
    read_deeppcb_txt,
    read_magnetic_tile,
    read_mask_folder,
    read_neu_det,
    read_voc,
    read_yolo,
    read_yolo_data_yaml,
)
from lineside.vision.box_records import DetectionFormatError, DetectionRecord, boxes_from_mask, load_detection_sample
from lineside.vision.box_splits import grouped_record_split, stratified_record_split
from lineside.vision.detection_data import (
    DetectionDataset,
    build_detection_eval_transform,
    build_detection_train_transform,
    detection_collate,
    detection_compose,
)


def gray(path: Path, w: int = 40, h: int = 30, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), value, np.uint8)).save(path)
    return path


def voc_xml(path: Path, objects: list[tuple[str, tuple]], filename: str = "a.png", size=(40, 30)) -> Path:
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width><height>{size[1]}</height></size>{objs}</annotation>")
    return path


# --------------------------------------------------------------------------- readers


def test_voc_reader(tmp_path):
    gray(tmp_path / "img" / "a.png")
    gray(tmp_path / "img" / "b.png")
    voc_xml(tmp_path / "ann" / "a.xml", [("scratch", (2, 3, 12, 20)), ("pit", (30, 5, 40, 30))])
    voc_xml(tmp_path / "ann" / "b.xml", [("pit", (1, 1, 5, 5))], filename="b")  # no extension, as in NEU-DET
    records, names = read_voc(tmp_path / "ann", tmp_path / "img", ["scratch", "pit"])
    assert names == ["scratch", "pit"]
    a, b = records
    assert a.path.endswith("a.png") and b.path.endswith("b.png")
    np.testing.assert_array_equal(a.boxes, [[2, 3, 12, 20], [30, 5, 40, 30]])
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    assert a.labels.tolist() == [0, 1] and b.labels.tolist() == [1]
    assert (a.width, a.height) == (40, 30)
    sample = load_detection_sample(a)
    assert sample["image"].shape == (30, 40, 3) and sample["image"].dtype == np.uint8
    assert "mask" not in sample and sample["path"] == a.path
    # without class_names: sorted names found
    assert read_voc(tmp_path / "ann", tmp_path / "img")[1] == ["pit", "scratch"]


def test_coco_reader(tmp_path):
    gray(tmp_path / "images" / "a.png")
    gray(tmp_path / "images" / "empty.png")
    coco = {
        "images": [{"id": 7, "file_name": "images/a.png", "width": 40, "height": 30}, {"id": 8, "file_name": "images/empty.png"}],
        "categories": [{"id": 3, "name": "pit"}, {"id": 1, "name": "scratch"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [5, 6, 10, 4]},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 2.5, 3]},
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [1, 1, 30, 20], "iscrowd": 1},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    records, names = read_coco(tmp_path / "ann.json")
    assert names == ["scratch", "pit"]  # by category id
    a, empty = records
    np.testing.assert_allclose(a.boxes, [[5, 6, 15, 10], [0, 0, 2.5, 3]])
    assert a.labels.tolist() == [1, 0]
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,) and (empty.width, empty.height) == (40, 30)
    assert len(read_coco(tmp_path / "ann.json", include_crowd=True)[0][0].labels) == 3


def test_yolo_reader_and_data_yaml(tmp_path):
    root = tmp_path / "ds"
    gray(root / "images" / "train" / "a.png", w=40, h=20)
    gray(root / "images" / "train" / "bg.png", w=40, h=20)  # no label file: background image
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n\n0 0.125 0.25 0.25 0.5\n")
    records, names = read_yolo(root / "images" / "train", ["scratch", "pit"])
    a, bg = records
    np.testing.assert_allclose(a.boxes, [[10, 5, 30, 15], [0, 0, 10, 10]])
    assert a.labels.tolist() == [1, 0] and bg.boxes.shape == (0, 4)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames:\n  0: scratch\n  1: pit\n")
    records2, names2 = read_yolo_data_yaml(root / "data.yaml", "val")
    assert names2 == ["scratch", "pit"] and [r.labels.tolist() for r in records2] == [[1, 0], []]


def test_deeppcb_reader(tmp_path):
    root = tmp_path / "PCBData" / "group123" / "123"
    gray(root / "123000_test.jpg", w=64, h=64)
    (tmp_path / "PCBData" / "group123" / "123_not").mkdir(parents=True)
    (tmp_path / "PCBData" / "group123" / "123_not" / "123000.txt").write_text("3 4 13 20 1\n40 41 50 60 6\n10,10,20,20,3\n")
    records, names = read_deeppcb(tmp_path)
    assert names == list(DEEPPCB_CLASSES) and len(records) == 1
    r = records[0]
    np.testing.assert_array_equal(r.boxes, [[3, 4, 13, 20], [40, 41, 50, 60], [10, 10, 20, 20]])
    assert r.labels.tolist() == [0, 5, 2] and r.group == "group123"


def test_mask_reader_two_blobs(tmp_path):
    mask = np.zeros((30, 40), np.uint8)
    mask[2:6, 3:10] = 255  # blob 1: x 3..9, y 2..5  → box (3, 2, 10, 6)
    mask[20:29, 30:32] = 200  # blob 2: x 30..31, y 20..28 → box (30, 20, 32, 29)
    mask[15, 15] = 100  # anti-aliasing below the threshold: not a region
    gray(tmp_path / "MT_Crack" / "Imgs" / "x.jpg")
    Image.fromarray(mask).save(tmp_path / "MT_Crack" / "Imgs" / "x.png")
    gray(tmp_path / "MT_Free" / "Imgs" / "y.jpg")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "MT_Free" / "Imgs" / "y.png")
    records, names = read_magnetic_tile(tmp_path)
    assert names == list(MAGNETIC_TILE_CLASSES)
    crack, free = records
    np.testing.assert_array_equal(crack.boxes, [[3, 2, 10, 6], [30, 20, 32, 29]])
    assert crack.labels.tolist() == [MAGNETIC_TILE_CLASSES.index("Crack")] * 2
    assert free.boxes.shape == (0, 4) and free.image_class == "Free"
    sample = load_detection_sample(crack)
    assert sample["mask"].dtype == np.uint8 and set(np.unique(sample["mask"])) == {0, 1}
    assert int(sample["mask"].sum()) == 4 * 7 + 9 * 2
    # diagonal neighbours: one region with 8-connectivity, two with 4
    diag = np.zeros((5, 5), np.uint8)
    diag[1, 1] = diag[2, 2] = 1
    assert len(boxes_from_mask(diag)) == 1 and len(boxes_from_mask(diag, connectivity=4)) == 2


# --------------------------------------------------------------------------- bad input


def test_malformed_files_name_the_file(tmp_path):
    gray(tmp_path / "img" / "a.png")
    bad_xml = tmp_path / "ann" / "a.xml"
    bad_xml.parent.mkdir()
    bad_xml.write_text("<annotation><object><name>pit</name>")
    with pytest.raises(DetectionFormatError, match=r"a\.xml: malformed XML"):
        read_voc(tmp_path / "ann", tmp_path / "img")
    voc_xml(bad_xml, [("pit", (1, 2, "x", 4))])
    with pytest.raises(DetectionFormatError, match=r"a\.xml: .*xmax 'x'"):
        read_voc(tmp_path / "ann", tmp_path / "img")
    bad_json = tmp_path / "coco.json"
    bad_json.write_text('{"images": [')
    with pytest.raises(DetectionFormatError, match=r"coco\.json: malformed JSON"):
        read_coco(bad_json)
    bad_json.write_text(json.dumps({"images": [{"id": 1, "file_name": "img/a.png"}], "categories": [{"id": 1, "name": "pit"}], "annotations": [{"id": 5, "image_id": 1, "category_id": 1}]}))
    with pytest.raises(DetectionFormatError, match=r"coco\.json: annotation #0 \(id 5\) is malformed"):
        read_coco(bad_json)
    (tmp_path / "img" / "a.txt").write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(DetectionFormatError, match=r"a\.txt:1: expected 'class cx cy w h'"):
        read_yolo(tmp_path / "img", ["pit"])
    pcb = tmp_path / "pcb.txt"
    pcb.write_text("1 2 3 4 1\n1 2 3\n")
    with pytest.raises(DetectionFormatError, match=r"pcb\.txt:2: expected 'x1 y1 x2 y2 type'"):
        read_deeppcb_txt(pcb, 40, 30)


def test_unknown_class_names_the_file(tmp_path):
    gray(tmp_path / "img" / "a.png")
    voc_xml(tmp_path / "ann" / "a.xml", [("dent", (1, 1, 5, 5))])
    with pytest.raises(DetectionFormatError, match=r"a\.xml: unknown class 'dent'"):
        read_voc(tmp_path / "ann", tmp_path / "img", ["pit"])
    (tmp_path / "img" / "a.txt").write_text("2 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DetectionFormatError, match=r"a\.txt:1: unknown class id 2"):
        read_yolo(tmp_path / "img", ["pit", "dent"])
    coco = {"images": [{"id": 1, "file_name": "img/a.png"}], "categories": [{"id": 1, "name": "pit"}], "annotations": [{"id": 9, "image_id": 1, "category_id": 4, "bbox": [1, 1, 2, 2]}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    with pytest.raises(DetectionFormatError, match=r"c\.json: annotation id 9 has unknown category_id 4"):
        read_coco(tmp_path / "c.json")
    pcb = tmp_path / "pcb.txt"
    pcb.write_text("1 2 3 4 7\n")
    with pytest.raises(DetectionFormatError, match=r"pcb\.txt:1: unknown defect type 7"):
        read_deeppcb_txt(pcb, 40, 30)


def test_boxes_clipped_dropped_or_refused(tmp_path, caplog):
    gray(tmp_path / "img" / "a.png")  # 40 x 30
    voc_xml(tmp_path / "ann" / "a.xml", [("pit", (-3, 2, 12, 35)), ("pit", (5, 5, 5, 9)), ("pit", (9, 9, 4, 12)), ("pit", (1, 1, 4, 4))])
    with caplog.at_level(logging.WARNING, logger="lineside.vision.box_records"):
        records, _ = read_voc(tmp_path / "ann", tmp_path / "img", ["pit"])
    np.testing.assert_array_equal(records[0].boxes, [[0, 2, 12, 30], [1, 1, 4, 4]])  # clipped; two degenerate dropped
    assert "clipped 1 boxes" in caplog.text and "dropped 2 degenerate boxes" in caplog.text and "a.xml" in caplog.text
    voc_xml(tmp_path / "ann" / "a.xml", [("pit", (45, 2, 60, 10))])
    with pytest.raises(DetectionFormatError, match=r"a\.xml: box 0 .* entirely outside the 40x30 image"):
        read_voc(tmp_path / "ann", tmp_path / "img", ["pit"])
    voc_xml(tmp_path / "ann" / "a.xml", [("pit", (1, 2, "nan", 10))])
    with pytest.raises(DetectionFormatError, match=r"a\.xml: box coordinates must be finite"):
        read_voc(tmp_path / "ann", tmp_path / "img", ["pit"])


def test_empty_and_mismatched_masks(tmp_path, caplog):
    gray(tmp_path / "a.png")
    gray(tmp_path / "b.png")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "a_mask.png")
    Image.fromarray(np.zeros((31, 40), np.uint8)).save(tmp_path / "b_mask.png")
    pairs = [(tmp_path / "a.png", tmp_path / "a_mask.png", "crack")]
    with pytest.raises(DetectionFormatError, match=r"a_mask\.png: mask of a 'crack' image is empty"):
        read_mask_folder(pairs, ["crack"], empty_masks="error")
    with caplog.at_level(logging.WARNING):
        assert read_mask_folder(pairs, ["crack"])[0] == []  # default: skipped and logged
    assert "skipped 1 images" in caplog.text and "a_mask.png" in caplog.text
    kept = read_mask_folder(pairs, ["crack"], empty_masks="keep")[0]
    assert len(kept) == 1 and kept[0].num_boxes == 0
    with pytest.raises(DetectionFormatError, match=r"b_mask\.png: mask is 40x31 but its image .*b\.png is 40x30"):
        read_mask_folder([(tmp_path / "b.png", tmp_path / "b_mask.png", "crack")], ["crack"])


def test_missing_or_resized_image_names_the_file(tmp_path):
    voc_xml(tmp_path / "ann" / "a.xml", [("pit", (1, 1, 5, 5))])
    (tmp_path / "img").mkdir()
    with pytest.raises(DetectionFormatError, match=r"a\.xml: its image 'a\.png' is not in"):
        read_voc(tmp_path / "ann", tmp_path / "img")
    gray(tmp_path / "img" / "a.png", w=50)
    records, _ = read_voc(tmp_path / "ann", tmp_path / "img")  # size from the XML: 40x30
    with pytest.raises(DetectionFormatError, match=r"a\.png: image is 50x30 but its annotation .*a\.xml says 40x30"):
        load_detection_sample(records[0])


# --------------------------------------------------------------------------- pipelines, dataset, collate


@pytest.fixture
def blob_record(tmp_path) -> DetectionRecord:
    """64x48 image, a bright rectangle x 5..14, y 10..19 with the same mask; box (5, 10, 15, 20)."""
    image = np.zeros((48, 64), np.uint8)
    image[10:20, 5:15] = 200
    Image.fromarray(image).save(tmp_path / "blob.png")
    Image.fromarray((image > 0).astype(np.uint8) * 255).save(tmp_path / "blob_mask.png")
    return DetectionRecord(
        str(tmp_path / "blob.png"), np.array([[5, 10, 15, 20]], np.float32), np.array([2]), 64, 48, mask_path=str(tmp_path / "blob_mask.png")
    )


def test_horizontal_flip_moves_box_and_mask(blob_record):
    ds = DetectionDataset([blob_record], detection_compose([A.HorizontalFlip(p=1.0)]))
    s = ds[0]
    assert s["image"].shape == (3, 48, 64) and s["image"].dtype == torch.uint8
    torch.testing.assert_close(s["boxes"], torch.tensor([[64 - 15, 10, 64 - 5, 20]], dtype=torch.float32))  # x → W - x
    assert s["labels"].tolist() == [2]
    ys, xs = torch.nonzero(s["mask"], as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1) == (49, 59, 10, 20)
    assert (s["image"][0] > 100).equal(s["mask"].bool())


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_keeps_boxes_on_the_defect(blob_record, seed):
    s = DetectionDataset([blob_record], build_detection_train_transform(32, seed=seed))[0]
    assert s["image"].shape == (3, 32, 32) and s["mask"].shape == (32, 32) and s["mask"].dtype == torch.uint8
    assert set(s["mask"].unique().tolist()) <= {0, 1}
    assert s["boxes"].shape == (1, 4) and s["labels"].tolist() == [2]
    ys, xs = torch.nonzero(s["mask"], as_tuple=True)
    mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    # the box encloses the moved mask to within a pixel (small rotation may loosen it a little)
    assert (s["boxes"][0] - mask_box).abs().max() <= 1.5, (s["boxes"], mask_box)


def test_eval_transform_scales_boxes(blob_record):
    s = DetectionDataset([blob_record], build_detection_eval_transform(32))[0]
    torch.testing.assert_close(s["boxes"], torch.tensor([[2.5, 20 / 3, 7.5, 40 / 3]]), atol=1e-4, rtol=0)
    no_tf = DetectionDataset([blob_record])[0]
    assert no_tf["image"].shape == (3, 48, 64) and no_tf["boxes"].tolist() == [[5, 10, 15, 20]]


def test_collate_pads_boxes_and_masks():
    def sample(m, mask):
        s = {"image": torch.zeros(1, 8, 8, dtype=torch.uint8), "boxes": torch.arange(m * 4, dtype=torch.float32).view(m, 4) + 1, "labels": torch.arange(m), "path": f"{m}.png"}
        if mask:
            s["mask"] = torch.ones(8, 8, dtype=torch.uint8)
        return s

    b = detection_collate([sample(2, True), sample(0, False), sample(3, False)])
    assert b["image"].shape == (3, 1, 8, 8) and b["boxes"].shape == (3, 3, 4) and b["labels"].shape == (3, 3)
    assert b["box_mask"].tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert b["labels"].tolist() == [[0, 1, -1], [-1, -1, -1], [0, 1, 2]]
    assert b["boxes"][0, 2].abs().sum() == 0 and b["boxes"][2, 2].tolist() == [9, 10, 11, 12]
    assert b["has_mask"].tolist() == [True, False, False] and b["mask"].sum().item() == 64
    assert b["path"] == ["2.png", "0.png", "3.png"]
    assert detection_collate([sample(0, False)])["boxes"].shape == (1, 1, 4)  # at least one slot
    with pytest.raises(ValueError, match="differ in shape"):
        detection_collate([sample(1, False), {**sample(1, False), "image": torch.zeros(1, 4, 8, dtype=torch.uint8)}])


def test_grouped_split_keeps_groups_whole():
    recs = [
        DetectionRecord(f"{c}{g}_{k}.png", np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 8, 8, group=f"{c}{g}", image_class=c)
        for c in "ab"
        for g in range(10)
        for k in range(6)
    ]
    parts = grouped_record_split(recs, 0.1, 0.2, seed=3)
    groups = {k: {r.group for r in v} for k, v in parts.items()}
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])
    assert sum(len(v) for v in parts.values()) == len(recs)
    assert Counter(r.image_class for r in parts["test"]) == {"a": 12, "b": 12}  # 2 groups of 6 per class
    assert parts == grouped_record_split(recs, 0.1, 0.2, seed=3) and parts != grouped_record_split(recs, 0.1, 0.2, seed=4)
    strat = stratified_record_split(recs, 0.1, 0.2, seed=0)
    assert Counter(r.image_class for r in strat["test"]) == {"a": 12, "b": 12}


# --------------------------------------------------------------------------- real data (../shared)


def _manifest(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_neu_det_real(shared_data):
    records, names = read_neu_det(shared_data / "neu_det")
    rows = _manifest(shared_data / "neu_det" / "manifest.csv")
    assert names == list(NEU_DET_CLASSES) and len(records) == len(rows) == 1200
    assert sum(r.num_boxes for r in records) == sum(int(r["n_boxes"]) for r in rows) == 2800
    box_col = [k for k in rows[0] if k.startswith("boxes")][0]
    expected = Counter(b.split(":")[0] for r in rows for b in r[box_col].split(";"))
    assert Counter(names[i] for r in records for i in r.labels) == expected
    assert Counter(r.image_class for r in records) == {c: 200 for c in NEU_DET_CLASSES}
    by_path = {Path(r.path).name: r for r in records}
    row = rows[2]  # crazing_105: four boxes, one of them 'inclusion'
    got = by_path[Path(row["image_path"]).name]
    want = [[float(v) for v in b.split(":")[1].split(",")] for b in row[box_col].split(";")]
    np.testing.assert_array_equal(got.boxes, want)
    s = DetectionDataset(records[:2], build_detection_train_transform(64, seed=0))[0]
    assert s["image"].shape == (3, 64, 64) and len(s["boxes"]) == len(s["labels"]) >= 1
    parts = stratified_record_split(records, 0.1, 0.2, seed=0)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [840, 120, 240]


def test_magnetic_tile_real(shared_data, caplog):
    root = shared_data / "magnetic_tile"
    rows = _manifest(root / "manifest.csv")
    with caplog.at_level(logging.WARNING):
        records, names = read_magnetic_tile(root)
    assert len(rows) == 883 and len(records) == 881  # the two empty Uneven masks are skipped and logged
    assert "skipped 2 images" in caplog.text
    assert Counter(r.image_class for r in records) == {"Free": 634, "Blowhole": 73, "Uneven": 64, "Break": 55, "Crack": 36, "Fray": 19}
    assert all(r.num_boxes == 0 for r in records if r.image_class == "Free")
    assert len({r.group for r in records}) == len({r["tile_group"] for r in rows}) == 164
    # manifest regions are 4-connected: that setting reproduces its 288 boxes exactly
    four, _ = read_magnetic_tile(root, empty_masks="keep", connectivity=4)
    assert sum(r.num_boxes for r in four) == sum(int(r["n_components"]) for r in rows) == 288
    box_col = [k for k in rows[0] if k.startswith("component_boxes")][0]
    for r, row in zip(four, rows):
        assert Path(r.path).name == Path(row["image_path"]).name
        want = sorted([float(v) for v in b.split(",")] for b in row[box_col].split(";") if b)
        assert sorted(r.boxes.tolist()) == want, r.path
    assert sum(r.num_boxes for r in records) == 285  # 8-connected (default)
    parts = grouped_record_split(records, 0.1, 0.2, seed=0)
    groups = {k: {r.group for r in v} for k, v in parts.items()}
    assert not (groups["train"] & groups["test"] or groups["train"] & groups["val"] or groups["val"] & groups["test"])
    assert all(Counter(r.image_class for r in parts[k])[c] > 0 for k in parts for c in ("Free", *MAGNETIC_TILE_CLASSES))
    s = detection_collate([DetectionDataset(records[:3], build_detection_eval_transform(64))[i] for i in range(3)])
    assert s["has_mask"].all() and s["mask"].shape == (3, 64, 64)


def test_deeppcb_real(shared_data):
    records, names = read_deeppcb(shared_data / "deeppcb")
    rows = _manifest(shared_data / "deeppcb" / "manifest.csv")
    assert names == list(DEEPPCB_CLASSES) and len(records) == len(rows) == 1000
    assert sum(r.num_boxes for r in records) == sum(int(r["n_boxes"]) for r in rows) == 6873
    box_col = [k for k in rows[0] if k.startswith("boxes")][0]
    assert Counter(names[i] for r in records for i in r.labels) == Counter(b.split(":")[0] for r in rows for b in r[box_col].split(";"))
    assert Counter(r.group for r in records) == Counter(r["board_group"] for r in rows)
    assert all((r.width, r.height) == (640, 640) for r in records)
    parts = stratified_record_split(records, 0.1, 0.2, seed=0, key=lambda r: r.group)
    assert sum(len(v) for v in parts.values()) == 1000 and len(parts["test"]) == 200
