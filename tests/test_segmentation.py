"""The segmentation task: EL crack cells (reader, module split, masks moved with flips), the encoder's
backbone maps, the FPN head (shapes, a gradient on every parameter), the criterion's masking, the
decoder (probabilities, defect heatmap, test-time views undone), ONNX export with parity, known-answer
metrics (IoU, crack F1@2px), host-side regions → boxes, and a fit of configs/tiny_seg.yaml through
the Lightning CLI on real cells."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lineside.fusion.fusion_transformer import FusionTransformer
from lineside.fusion.model import InspectionModel
from lineside.fusion.postprocess import dihedral_views
from lineside.fusion.segmentation_criterion import SegmentationCriterion
from lineside.fusion.segmentation_decoder import undo_dihedral_views
from lineside.fusion.segmentation_head import SegmentationHead, SegmentationOutput
from lineside.fusion.segmentation_metrics import SegmentationMetrics, TolerantF1
from lineside.fusion.tasks import SegmentationTask
from lineside.vision.el_cracks import (
    ElCrackRecord,
    ElCracksDataset,
    build_segmentation_eval_transform,
    module_split,
    read_el_cracks,
    segmentation_collate,
)
from lineside.vision.image_encoder import ImageEncoder
from lineside.vision.io import ImageReadError
from lineside.vision.segmentation_regions import regions_to_boxes

REPO = Path(__file__).resolve().parents[1]
EL_CRACKS = REPO.parent / "shared" / "data" / "el_cracks"
SIZE = 64
CLASSES = ["dark_area", "crossing", "crack", "busbar"]


def tiny_model(seed: int = 0) -> InspectionModel:
    torch.manual_seed(seed)
    enc = ImageEncoder("test_efficientnet", 32, 1, feature_levels=[-1], pretrained=False, dense_levels=[1, 2, 3])
    head = SegmentationHead(32, enc.map_channels, 4, decoder_dim=16)
    return InspectionModel(image_encoder=enc, fusion=FusionTransformer(32, 1, 2, dropout=0.0), heads={"segmentation": head})


def frames(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- encoder and head


def test_dense_levels_add_maps_and_leave_the_tokens_alone():
    torch.manual_seed(0)
    plain = ImageEncoder("test_efficientnet", 32, 1, feature_levels=[-1], pretrained=False).eval()
    dense = ImageEncoder("test_efficientnet", 32, 1, feature_levels=[-1], pretrained=False, dense_levels=[1, 2, 3]).eval()
    dense.load_state_dict(plain.state_dict())  # same parameters: dense levels add none
    x = frames()
    a, b = plain(x), dense(x)
    assert a.maps == () and torch.equal(a.tokens, b.tokens) and a.levels == b.levels
    assert dense.map_strides == [4, 8, 16] and dense.strides == plain.strides == [32]
    assert [tuple(m.shape) for m in b.maps] == [(2, c, SIZE // s, SIZE // s) for c, s in zip(dense.map_channels, dense.map_strides)]


def test_head_gives_logits_at_stride_4_and_a_gradient_on_every_parameter():
    model = tiny_model().train()
    out = model(frames())
    raw = out.extra["segmentation"]
    assert tuple(raw.logits.shape) == (2, 5, SIZE // 4, SIZE // 4)
    mask = torch.zeros(2, SIZE, SIZE, dtype=torch.int64)
    mask[:, 30:32, :] = 3  # a crack
    mask[:, :, 10:14] = 4  # a busbar
    loss = SegmentationCriterion(4)(raw, {"seg_mask": mask, "has_seg": torch.tensor([True, True])})["loss"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing
    assert torch.isfinite(loss)


def test_head_channels_must_match_the_encoder_maps():
    enc = ImageEncoder("test_efficientnet", 32, 1, feature_levels=[-1], pretrained=False, dense_levels=[1, 2])
    with pytest.raises(ValueError, match="dense_levels"):
        InspectionModel(image_encoder=enc, fusion=FusionTransformer(32, 1, 2), heads={"segmentation": SegmentationHead(32, [24, 32, 48])})


# --------------------------------------------------------------------------- criterion


def test_criterion_adds_no_loss_and_no_gradient_for_cells_without_masks():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 8, 8, requires_grad=True)
    mask = torch.randint(0, 5, (3, 32, 32))
    crit = SegmentationCriterion(4, weight_dict={"loss_seg_ce": 1.0, "loss_seg_dice": 0.5})
    out = crit(SegmentationOutput(logits), {"seg_mask": mask, "has_seg": torch.tensor([True, False, True])})
    assert set(out) == {"loss_seg_ce", "loss_seg_dice", "loss"}
    out["loss"].backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0 and logits.grad[2].abs().sum() > 0
    # the unlabelled cell's mask does not matter
    mask2 = mask.clone()
    mask2[1] = 0
    out2 = crit(SegmentationOutput(logits), {"seg_mask": mask2, "has_seg": torch.tensor([True, False, True])})
    assert torch.allclose(out["loss"], out2["loss"])
    # no labelled cell: zero loss, zero gradient
    logits.grad = None
    none = crit(SegmentationOutput(logits), {"seg_mask": mask, "has_seg": torch.zeros(3, dtype=torch.bool)})
    none["loss"].backward()
    assert float(none["loss"].detach()) == 0.0 and logits.grad.abs().sum() == 0


def test_criterion_is_lower_for_the_right_answer():
    mask = torch.zeros(1, 16, 16, dtype=torch.int64)
    mask[0, 7:9] = 3
    right = torch.nn.functional.one_hot(mask, 5).permute(0, 3, 1, 2).float() * 10
    crit = SegmentationCriterion(4)
    assert crit(SegmentationOutput(right), {"seg_mask": mask})["loss"] < crit(SegmentationOutput(-right), {"seg_mask": mask})["loss"]


# --------------------------------------------------------------------------- decoder and export


def test_decoder_outputs_probabilities_and_the_defect_heatmap():
    from lineside.fusion.deployable import DeployableModel

    model = tiny_model().eval()
    dep = DeployableModel(model, (SIZE, SIZE))
    assert dep.output_names == ["defect_masks", "defect_heatmap"]
    out = dep.run(frames(3))
    masks, heat = out["defect_masks"], out["defect_heatmap"]
    assert tuple(masks.shape) == (3, 4, SIZE // 4, SIZE // 4) and tuple(heat.shape) == (3, 1, SIZE // 4, SIZE // 4)
    with torch.no_grad():
        probs = model(dep.preprocess(frames(3))).extra["segmentation"].logits.softmax(1)
    torch.testing.assert_close(masks, probs[:, 1:])
    torch.testing.assert_close(heat, 1 - probs[:, :1] - probs[:, 4:5])  # busbar is structure, not a defect
    assert dep.output_specs()[0].description.startswith("per-class probability at stride 4")


def test_views_are_undone():
    maps = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    for v in (1, 2, 4, 8):
        torch.testing.assert_close(undo_dihedral_views(dihedral_views(maps, v), v), maps)


def test_onnx_export_with_parity(tmp_path):
    from lineside.export.checkpoint import LoadedModel
    from lineside.export.deployable import build_deployable
    from lineside.export.onnx_export import export_onnx
    from lineside.export.trt_ops import unsupported_ops
    from lineside.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from lineside.runtime.verify import verify_artefact

    loaded = LoadedModel(tiny_model().eval(), [], SIZE, 1, tasks=["segmentation"])
    r = export_onnx(loaded, tmp_path, batch_sizes=(1, 4), parity_images=4, verify=verify_artefact)
    assert r.ok and r.parity is not None, r.parity.table() if r.parity else None
    assert [o["name"] for o in r.metadata["outputs"]] == ["defect_masks", "defect_heatmap"]
    assert unsupported_ops(r.path) == {}
    x = frames(3, seed=1)
    got = OnnxRuntimeBackend(r.path)(x.numpy())
    ref = build_deployable(loaded).run(x)
    for name in ("defect_masks", "defect_heatmap"):
        np.testing.assert_allclose(got[name], ref[name].numpy(), atol=1e-5)


# --------------------------------------------------------------------------- metrics


def _line(offset: int, size: int = 64) -> torch.Tensor:
    m = torch.zeros(1, size, size, dtype=torch.bool)
    m[0, 10:54, 30 + offset] = True  # a 1-px vertical crack
    return m


def test_crack_f1_with_a_2px_tolerance():
    for shift, expected in ((0, 1.0), (1, 1.0), (2, 1.0), (5, 0.0)):
        f1 = TolerantF1(2.0)
        f1.update(_line(shift), _line(0))
        assert float(f1.compute()["f1"]) == pytest.approx(expected), shift
    f1 = TolerantF1(2.0)
    f1.update(_line(1), _line(0))
    f1.update(_line(5), _line(0))  # half the predicted pixels are off: precision and recall 0.5
    assert float(f1.compute()["f1"]) == pytest.approx(0.5)


def _as_probs(mask: torch.Tensor, k: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(mask, k + 1).permute(0, 3, 1, 2).float()[:, 1:]


def test_iou_of_identical_masks_is_one_and_the_heatmap_ranks_defects():
    mask = torch.zeros(2, 32, 32, dtype=torch.int64)
    mask[:, 5:8, :] = 4
    mask[0, 15, 3:28] = 3
    mask[1, 20:26, 20:26] = 1
    mask[0, 15, 10] = 2
    probs = _as_probs(mask)
    heat = probs[:, :3].sum(1, keepdim=True)
    m = SegmentationMetrics(CLASSES, defect_classes=[1, 2, 3], thin_classes=[3])
    m.update(probs, heat, mask, torch.tensor([True, True]))
    r = m.compute()
    assert all(r[f"iou/{n}"] == pytest.approx(1.0) for n in ["background", *CLASSES])
    assert r["miou"] == pytest.approx(1.0) and r["crack_f1_2px"] == pytest.approx(1.0)
    assert r["pixel_auroc"] == pytest.approx(1.0) and r["pro"] > 0.99
    m.reset()
    wrong = mask.clone()
    wrong[0, 15, 3:28] = 0
    m.update(_as_probs(wrong), heat, mask, torch.tensor([True, False]))  # the second cell has no mask: ignored
    r = m.compute()
    assert r["iou/crack"] == pytest.approx(0.0) and r["crack_f1_2px"] == 0.0 and m.images == 1


# --------------------------------------------------------------------------- regions → boxes


def test_regions_to_boxes():
    masks = np.zeros((1, 4, 16, 16), np.float32)
    masks[0, 2, 4, 2:10] = 0.9  # a crack row, cells x 2..9
    masks[0, 2, 12:14, 12:14] = 0.6
    masks[0, 3, :, 0] = 1.0  # busbar: structure, skipped
    out = regions_to_boxes(masks, 4, CLASSES, threshold=0.5, skip=["busbar"])
    assert len(out) == 1 and [r["label"] for r in out[0]] == ["crack", "crack"]
    first, second = out[0]
    assert first["box"] == [8, 16, 40, 20] and first["score"] == pytest.approx(0.9) and first["area"] == 8
    assert second["box"] == [48, 48, 56, 56] and second["score"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="K=4"):
        regions_to_boxes(masks[:, :3], 4, CLASSES)


# --------------------------------------------------------------------------- data


def _cell(tmp_path: Path, name: str = "EL1_1") -> ElCrackRecord:
    img = np.full((40, 40), 80, np.uint8)
    img[:, 5:8] = 250  # bright column on the left
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 5:8] = 3
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    Image.fromarray(np.stack([img] * 3, -1)).save(tmp_path / "images" / f"{name}.jpg", quality=100)
    Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
    return ElCrackRecord(str(tmp_path / "images" / f"{name}.jpg"), str(tmp_path / "masks" / f"{name}.png"), "EL1", (3,))


def test_flips_move_the_mask_with_the_frame(tmp_path):
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    from lineside.vision.transforms import FrameResize

    rec = _cell(tmp_path)
    flip = A.Compose([FrameResize(32, 32, mask_interpolation=0), A.HorizontalFlip(p=1.0), ToTensorV2()])
    s = ElCracksDataset([rec], flip)[0]
    assert s["image"].dtype == torch.uint8 and tuple(s["image"].shape) == (1, 32, 32)
    assert s["seg_mask"].dtype == torch.int64 and tuple(s["seg_mask"].shape) == (32, 32) and bool(s["has_seg"])
    crack = s["seg_mask"] == 3
    assert crack[:, 24:].any() and not crack[:, :16].any()  # moved to the right
    assert s["image"][0][crack].float().mean() > 200 > s["image"][0][~crack].float().mean()
    assert set(s["seg_mask"].unique().tolist()) <= {0, 3}  # nearest neighbour: no blended values


def test_bad_mask_file_is_named(tmp_path):
    rec = _cell(tmp_path)
    Path(rec.mask).write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="EL1_1.png"):
        ElCracksDataset([rec], build_segmentation_eval_transform(32))[0]
    bad = np.full((40, 40), 9, np.uint8)
    Image.fromarray(bad).save(rec.mask)
    with pytest.raises(ImageReadError, match="mask value 9"):
        ElCracksDataset([rec])[0]


def test_collate_marks_cells_without_masks():
    a = {"image": torch.zeros(1, 8, 8, dtype=torch.uint8), "seg_mask": torch.ones(8, 8, dtype=torch.int64), "has_seg": torch.tensor(True)}
    b = {"image": torch.zeros(1, 8, 8, dtype=torch.uint8), "grade": 2}
    batch = segmentation_collate([a, b])
    assert batch["has_seg"].tolist() == [True, False] and batch["grade"].tolist() == [-1, 2]
    assert batch["seg_mask"][1].sum() == 0 and batch["seg_mask"].dtype == torch.int64


@pytest.mark.needs_shared
def test_real_cells_split_by_module():
    if not EL_CRACKS.is_dir():
        pytest.skip(f"{EL_CRACKS} is absent (real data sits beside the repo as ../shared)")
    records = read_el_cracks(EL_CRACKS)
    assert len(records) == 1033
    parts = module_split(records, 0.1, 0.2, seed=0)
    modules = {k: {r.module for r in v} for k, v in parts.items()}
    assert not (modules["train"] & modules["val"]) and not (modules["train"] & modules["test"]) and not (modules["val"] & modules["test"])
    n = {k: len(v) for k, v in parts.items()}
    assert sum(n.values()) == 1033 and abs(n["test"] / 1033 - 0.2) < 0.02 and abs(n["val"] / 1033 - 0.1) < 0.02
    assert module_split(records, 0.1, 0.2, seed=0) == parts
    s = ElCracksDataset(parts["test"][:1], build_segmentation_eval_transform(96))[0]
    assert tuple(s["image"].shape) == (1, 96, 96) and int(s["seg_mask"].max()) <= 4


# --------------------------------------------------------------------------- the Lightning CLI


@pytest.mark.needs_shared
def test_tiny_config_fits_on_real_cells(tmp_path):
    if not EL_CRACKS.is_dir():
        pytest.skip(f"{EL_CRACKS} is absent (real data sits beside the repo as ../shared)")
    from lineside.fusion.training_cli import main

    cfg = yaml.safe_load((REPO / "configs" / "tiny_seg.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    cfg["data"]["init_args"]["root"] = str(EL_CRACKS)
    path = tmp_path / "tiny_seg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = main(["fit", "--config", str(path)])
    assert isinstance(cli.model.model.tasks[0], SegmentationTask)
    rows = list(csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    losses = [float(r["train/loss_seg_ce"]) for r in rows if r.get("train/loss_seg_ce")]
    assert len(losses) == 4 and all(np.isfinite(losses))
    val = [r for r in rows if r.get("val/miou")]
    assert val and 0.0 <= float(val[-1]["val/miou"]) <= 1.0 and "val/crack_f1_2px" in val[-1] and val[-1]["val/iou/crack"] != ""
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["lineside"]["tasks"] == ["segmentation"] and ckpt["lineside"]["image_size"] == 64
