"""Defect localization: LocalizationHead, LocalizationCriterion, BoxDecoder (and its ONNX graph),
detection metrics, and a tiny encoder + fusion + head overfitting a few NEU-DET images."""

from __future__ import annotations

import importlib.util
import math
import time
import numpy as np
import pytest
import torch

from lineside.fusion.box_decoder import BoxDecoder
from lineside.fusion.fusion_transformer import FusionOutput, FusionTransformer
from lineside.fusion.grading_head import GradingHead
from lineside.fusion.localization_criterion import LocalizationCriterion
from lineside.fusion.localization_head import HEATMAP_PRIOR_BIAS, LocalizationHead, LocalizationOutput
from lineside.fusion.model import InspectionModel
from lineside.vision.image_encoder import EncoderOutput, ImageEncoder

D, C = 32, 3


def synthetic_fused(b: int = 2, levels=((8, 8), (4, 4)), extra_before: int = 5, extra_after: int = 7):
    """Fused tokens with another modality before and after the image span; the level-0 tokens
    carry their (y, x) cell index in channels 0/1 so tests can check the reshape."""
    n_img = sum(h * w for h, w in levels)
    tokens = torch.randn(b, extra_before + n_img + extra_after, D)
    h, w = levels[0]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    tokens[:, extra_before : extra_before + h * w, 0] = ys.flatten().float()
    tokens[:, extra_before : extra_before + h * w, 1] = xs.flatten().float()
    fused = FusionOutput(torch.randn(b, 1, D), tokens, torch.zeros(b, tokens.shape[1], dtype=torch.bool),
                   {"image": (extra_before, extra_before + n_img), "text": (extra_before + n_img, tokens.shape[1])})
    image = EncoderOutput(torch.zeros(b, n_img, D), torch.zeros(b, n_img, 2), torch.zeros(b, n_img, dtype=torch.bool), tuple(levels))
    return fused, image


def batch_targets(size: int = 64):
    """Two box-labelled samples (stride 8 on 64 px → 8×8 cells) and one sample without box labels."""
    boxes = torch.zeros(3, 2, 4)
    labels = torch.full((3, 2), -1)
    box_mask = torch.zeros(3, 2, dtype=torch.bool)
    boxes[0, 0], labels[0, 0] = torch.tensor([4.0, 6.0, 20.0, 30.0]), 1
    boxes[0, 1], labels[0, 1] = torch.tensor([30.0, 40.0, 60.0, 50.0]), 2
    boxes[1, 0], labels[1, 0] = torch.tensor([10.0, 10.0, 26.0, 18.0]), 0
    box_mask[0, :2] = True
    box_mask[1, 0] = True
    mask = torch.zeros(3, size, size, dtype=torch.uint8)
    mask[1, 10:18, 10:26] = 1
    return {
        "boxes": boxes, "labels": labels, "box_mask": box_mask, "mask": mask,
        "has_mask": torch.tensor([False, True, False]), "has_boxes": torch.tensor([True, True, False]),
        "image": torch.zeros(3, 1, size, size, dtype=torch.uint8),
    }


def perfect_outputs(criterion: LocalizationCriterion, like: LocalizationOutput, targets: dict) -> LocalizationOutput:
    t = criterion.build_targets(like, targets)
    heat = t["heatmap"].clamp(1e-4, 1 - 1e-4)
    heat = torch.where(t["heatmap"] == 1, torch.full_like(heat, 12.0), torch.logit(heat) - 6.0)
    size = like.size.detach().clone()
    offset = like.offset.detach().clone()
    b, n = t["cell"].shape[:2]
    for i in range(b):
        for j in range(n):
            if t["box_valid"][i, j]:
                x, y = t["cell"][i, j].tolist()
                size[i, :, y, x] = t["size"][i, j]
                offset[i, :, y, x] = t["offset"][i, j]
    defect = torch.logit(t["defect"].clamp(1e-4, 1 - 1e-4))
    return LocalizationOutput(heat, size, offset, defect)


# --------------------------------------------------------------------------- head


def test_head_shapes_and_level_selection() -> None:
    fused, image = synthetic_fused()
    head = LocalizationHead(D, C, level_index=0, hidden=16)
    out = head(fused, image)
    assert out.heatmap.shape == (2, C, 8, 8) and out.size.shape == (2, 2, 8, 8)
    assert out.offset.shape == (2, 2, 8, 8) and out.defect.shape == (2, 1, 8, 8)
    assert all(torch.isfinite(x).all() for x in out)
    tokens, h, w = head.level_tokens(fused, image)
    grid = tokens[..., :2].transpose(1, 2).reshape(2, 2, h, w)
    assert torch.equal(grid[0, 0], torch.arange(8.0).view(8, 1).expand(8, 8))  # row index along y
    assert torch.equal(grid[0, 1], torch.arange(8.0).view(1, 8).expand(8, 8))  # column index along x
    coarse = LocalizationHead(D, C, level_index=1, hidden=16)(fused, image)
    assert coarse.heatmap.shape == (2, C, 4, 4)
    assert torch.allclose(head.heatmap[-1].bias, torch.full((C,), HEATMAP_PRIOR_BIAS))
    with pytest.raises(ValueError, match="levels"):
        head(fused, image._replace(levels=((8, 8),)))


# --------------------------------------------------------------------------- criterion


def test_criterion_targets_perfect_and_random() -> None:
    torch.manual_seed(0)
    targets = batch_targets()
    crit = LocalizationCriterion(C)
    rand = LocalizationOutput(torch.randn(3, C, 8, 8), torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8), torch.randn(3, 1, 8, 8))
    t = crit.build_targets(rand, targets)
    assert t["stride"] == (8.0, 8.0)
    assert t["heatmap"][0, 1, 2, 1] == 1.0 and t["heatmap"][0, 2, 5, 5] == 1.0 and t["heatmap"][1, 0, 1, 2] == 1.0
    assert int(t["heatmap"].eq(1).sum()) == 3 and t["heatmap"][2].sum() == 0
    assert torch.allclose(t["offset"][0, 0], torch.tensor([0.5, 0.25]))
    assert torch.allclose(t["size"][0, 0].exp(), torch.tensor([16.0, 24.0]))
    # defect: sample 1 from its mask (area coverage), sample 0 from box interiors
    assert torch.allclose(t["defect"][1, 0, 1, 1:4], torch.tensor([0.5625, 0.75, 0.1875]))
    assert t["defect"][0, 0, 1, 0] == 0.5 * 1.0 and t["defect"][0, 0, 7, 7] == 0
    assert t["labelled"].tolist() == [True, True, False]

    random_losses = crit(rand, targets)
    perfect = crit(perfect_outputs(crit, rand, targets), targets)
    assert set(perfect) == {"loss_heatmap", "loss_size", "loss_offset", "loss_defect", "loss"}
    assert perfect["loss_size"] < 1e-6 and perfect["loss_offset"] < 1e-6
    assert perfect["loss_heatmap"] < 0.05 * random_losses["loss_heatmap"]
    assert perfect["loss_defect"] < random_losses["loss_defect"]
    assert torch.isclose(random_losses["loss"], sum(random_losses[k] for k in crit.weight_dict))


def test_unlabelled_samples_add_nothing() -> None:
    torch.manual_seed(1)
    targets = batch_targets()
    out = LocalizationOutput(*(torch.randn(3, k, 8, 8) for k in (C, 2, 2, 1)))
    crit = LocalizationCriterion(C, weight_dict={"loss_heatmap": 1, "loss_size": 1, "loss_offset": 1, "loss_defect": 1, "loss_dice": 1})
    full = crit(out, targets)
    first_two = crit(LocalizationOutput(*(x[:2] for x in out)), {k: v[:2] for k, v in targets.items()})
    # a third sample with wildly different outputs but no box labels changes nothing
    wild = LocalizationOutput(*(torch.cat([x[:2], 100 * torch.randn_like(x[2:])]) for x in out))
    for name in full:
        assert torch.isclose(full[name], first_two[name]), name
        assert torch.isclose(crit(wild, targets)[name], full[name]), name
    # nothing labelled at all: an exact zero that still has a graph
    params = [x.clone().requires_grad_(True) for x in out]
    none = crit(LocalizationOutput(*params), {**targets, "has_boxes": torch.zeros(3, dtype=torch.bool), "box_mask": torch.zeros(3, 2, dtype=torch.bool), "has_mask": torch.zeros(3, dtype=torch.bool)})
    assert none["loss"] == 0
    none["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in params)


def test_gradients_reach_every_head_parameter() -> None:
    torch.manual_seed(2)
    fused, image = synthetic_fused(b=3)
    head = LocalizationHead(D, C, level_index=0, hidden=16)
    crit = LocalizationCriterion(C, weight_dict={"loss_heatmap": 1, "loss_size": 1, "loss_offset": 1, "loss_defect": 1, "loss_dice": 0.5})
    losses = crit(head(fused, image), batch_targets())
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


# --------------------------------------------------------------------------- decoder


def _peaks_output(h: int = 8, w: int = 8) -> LocalizationOutput:
    heat = -8.0 - torch.arange(C * h * w, dtype=torch.float32).view(1, C, h, w) / (C * h * w)  # distinct background
    heat[0, 2, 5, 3] = 4.0  # class 2, best
    heat[0, 0, 1, 6] = 2.0  # class 0, second
    heat[0, 0, 1, 5] = 1.0  # lower neighbour of the second peak: suppressed by the 3×3 max-pool
    size = torch.zeros(1, 2, h, w)
    size[0, :, 5, 3] = torch.tensor([math.log(20.0), math.log(10.0)])
    size[0, :, 1, 6] = torch.tensor([math.log(8.0), math.log(12.0)])
    offset = torch.full((1, 2, h, w), 0.5)
    offset[0, :, 5, 3] = torch.tensor([0.25, 0.75])
    return LocalizationOutput(heat, size, offset, torch.zeros(1, 1, h, w))


def test_decoder_two_peaks_and_peak_suppression() -> None:
    dec = BoxDecoder(stride=8, train_size=(64, 64), top_k=5)
    boxes, scores, labels, defect = dec(_peaks_output())
    assert boxes.shape == (1, 5, 4) and scores.shape == (1, 5) and labels.shape == (1, 5) and defect.shape == (1, 1, 8, 8)
    assert boxes.dtype == scores.dtype == defect.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels[0, :2].tolist() == [2, 0]
    assert torch.allclose(scores[0, :2], torch.sigmoid(torch.tensor([4.0, 2.0])))
    cx, cy = (3 + 0.25) * 8, (5 + 0.75) * 8
    assert torch.allclose(boxes[0, 0], torch.tensor([cx - 10, cy - 5, cx + 10, cy + 5]))
    assert torch.allclose(boxes[0, 1], torch.tensor([52.0 - 4, 12.0 - 6, 52.0 + 4, 12.0 + 6]))
    # the neighbour (logit 1) is gone: the third score is the background level
    assert scores[0, 2] < torch.sigmoid(torch.tensor(-7.9)) and torch.allclose(defect, torch.full_like(defect, 0.5))
    # frames of 128x96 given to a model trained on 64x64: boxes scale to the frame
    big = BoxDecoder(stride=8, train_size=(64, 64), input_size=(96, 128), top_k=5)(_peaks_output())[0]
    assert torch.allclose(big[0, 0], boxes[0, 0] * torch.tensor([2.0, 1.5, 2.0, 1.5]))
    assert [s.name for s in dec.outputs()] == ["boxes", "box_scores", "box_labels", "defect_heatmap"]
    assert [s.kind for s in dec.outputs()] == ["box", "box_score", "box_label", "float"]


class _DecoderGraph(torch.nn.Module):
    def __init__(self, decoder: BoxDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, heatmap, size, offset, defect):
        return self.decoder(LocalizationOutput(heatmap, size, offset, defect))


def test_decoder_onnx_matches_eager(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from lineside.export.trt_ops import unsupported_ops

    torch.manual_seed(3)
    dec = BoxDecoder(stride=8, train_size=(64, 64), input_size=(96, 96), top_k=10).eval()
    module = _DecoderGraph(dec).eval()
    example = _peaks_output()
    n = torch.export.Dim("N", min=1, max=64)
    path = tmp_path / "decoder.onnx"
    torch.onnx.export(
        module, tuple(example), str(path), dynamo=True, opset_version=18,
        input_names=["heatmap", "size", "offset", "defect"], output_names=[s.name for s in dec.outputs()],
        dynamic_shapes={"heatmap": {0: n}, "size": {0: n}, "offset": {0: n}, "defect": {0: n}}, external_data=False,
    )
    model = onnx.load(str(path))
    assert unsupported_ops(model) == {}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = LocalizationOutput(torch.randn(3, C, 8, 8) * 3, torch.randn(3, 2, 8, 8) + 2, torch.rand(3, 2, 8, 8), torch.randn(3, 1, 8, 8))
    batch = LocalizationOutput(*(torch.cat([a, b]) for a, b in zip(example, batch)))  # includes the hand-made peaks
    got = sess.run(None, {k: v.numpy() for k, v in zip(["heatmap", "size", "offset", "defect"], batch)})
    want = [x.numpy() for x in dec(batch)]
    for g, w, spec in zip(got, want, dec.outputs()):
        assert g.dtype == np.dtype(spec.dtype) and g.shape == w.shape, spec.name
        if spec.kind == "decoded":
            assert (g == w).all(), spec.name
        else:
            np.testing.assert_allclose(g, w, atol=1e-5, err_msg=spec.name)


# --------------------------------------------------------------------------- metrics


def test_box_map_perfect_and_pixel_auroc() -> None:
    from lineside.fusion.detection_metrics import BoxMeanAP, PixelAUROC, coco_backend

    try:
        coco_backend()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))

    targets = batch_targets()
    metric = BoxMeanAP(["a", "b", "c"])
    k = 4
    boxes = torch.zeros(3, k, 4)
    boxes[:, :2] = targets["boxes"]
    scores = torch.zeros(3, k)
    scores[:, :2] = targets["box_mask"].float() * 0.9
    labels = targets["labels"].clamp_min(0)
    labels = torch.cat([labels, torch.zeros(3, k - 2, dtype=torch.long)], 1)
    metric.update(boxes, scores, labels, targets["boxes"], targets["labels"], targets["box_mask"], keep=targets["has_boxes"])
    r = metric.compute()
    assert r["map_50"] == pytest.approx(1.0) and r["map"] == pytest.approx(1.0)
    assert r["ap_50/a"] == pytest.approx(1.0) and r["ap/c"] == pytest.approx(1.0)
    # the only box of class b moved off its target by its own width: a miss
    metric.reset()
    shifted = boxes.clone()
    shifted[0, 0] += torch.tensor([16.0, 0, 16.0, 0])
    metric.update(shifted, scores, labels, targets["boxes"], targets["labels"], targets["box_mask"], keep=targets["has_boxes"])
    assert metric.compute()["ap_50/b"] < 0.5

    auroc = PixelAUROC(max_pixels=1000)
    perfect = targets["mask"].float().unsqueeze(1)
    auroc.update(perfect, targets["mask"], targets["has_mask"])
    assert auroc.compute() == pytest.approx(1.0)
    auroc.reset()
    auroc.update(1 - perfect, targets["mask"], targets["has_mask"])
    assert auroc.compute() == pytest.approx(0.0)


# --------------------------------------------------------------------------- the whole model


def tiny_model(num_classes: int = C, in_chans: int = 1) -> InspectionModel:
    encoder = ImageEncoder(backbone="test_efficientnet", pretrained=False, feature_levels=[-2, -1], embed_dim=32, in_chans=in_chans)
    fusion = FusionTransformer(embed_dim=32, depth=1, dropout=0.0)
    return InspectionModel(encoder, fusion, GradingHead(32, 4), localization_head=LocalizationHead(32, num_classes, level_index=0))


class _ImageToBoxes(torch.nn.Module):
    def __init__(self, model: InspectionModel, decoder: BoxDecoder) -> None:
        super().__init__()
        self.model, self.decoder = model, decoder

    def forward(self, image):
        return self.decoder(self.model(image).localization)


def test_model_with_head_exports_image_to_boxes(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from lineside.export.trt_ops import unsupported_ops

    torch.manual_seed(4)
    model = tiny_model().eval()
    image = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    out = model(image)
    assert out.grade_logits.shape == (2, 4) and out.localization.heatmap.shape == (2, C, 4, 4)  # stride 16 on 64 px
    stride = model.image_encoder.strides[model.localization_head.level_index]
    decoder = BoxDecoder(stride, train_size=(64, 64), top_k=8)
    module = _ImageToBoxes(model, decoder).eval()
    path = tmp_path / "boxes.onnx"
    n = torch.export.Dim("N", min=1, max=64)
    torch.onnx.export(module, (image,), str(path), dynamo=True, opset_version=18, input_names=["image"],
                      output_names=[s.name for s in decoder.outputs()], dynamic_shapes={"image": {0: n}}, external_data=False)
    assert unsupported_ops(str(path)) == {}
    batch = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": batch.numpy()})
    with torch.inference_mode():
        want = [x.numpy() for x in module(batch)]
    for g, w, spec in zip(got, want, decoder.outputs()):
        assert g.shape == w.shape and g.dtype == np.dtype(spec.dtype), spec.name
        if spec.kind in ("float", "box", "box_score"):
            np.testing.assert_allclose(g, w, atol=1e-4, err_msg=spec.name)
    assert (got[2] == want[2]).mean() > 0.9  # labels: near-tied scores may swap places
    assert [tuple(g.shape[1:]) for g in got] == [tuple(s.shape[1:]) for s in decoder.outputs()]


# --------------------------------------------------------------------------- overfitting real images


@pytest.mark.slow  # 10-20 s on two CPU cores
@pytest.mark.needs_shared
def test_tiny_model_overfits_neu_det(shared_data) -> None:
    from lineside.fusion.detection_metrics import BoxMeanAP
    from lineside.vision.box_formats import read_neu_det
    from lineside.vision.detection_data import DetectionDataset, build_detection_eval_transform, detection_collate

    root = shared_data / "neu_det"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    records, names = read_neu_det(root)
    by_class: dict = {}
    for r in records:
        by_class.setdefault(r.image_class, []).append(r)
    picked = [r for rs in by_class.values() for r in rs[:2]][:8]
    ds = DetectionDataset(picked, build_detection_eval_transform(128), channels=1)
    batch = detection_collate([ds[i] for i in range(len(ds))])

    torch.manual_seed(0)
    model = tiny_model(len(names))
    stride = model.image_encoder.strides[model.localization_head.level_index]
    crit = LocalizationCriterion(len(names), stride=stride)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    start = time.perf_counter()
    for _ in range(40):
        out = model(batch["image"])
        loss = crit(out, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert out.localization.heatmap.shape[-2:] == (128 // stride,) * 2
    assert all(math.isfinite(v) for v in losses)
    print(f"loss {np.mean(losses[:3]):.3f} -> {np.mean(losses[-5:]):.3f} in {time.perf_counter() - start:.1f} s")
    assert np.mean(losses[-5:]) < 0.4 * np.mean(losses[:3]), (losses[:3], losses[-5:])
    if importlib.util.find_spec("faster_coco_eval") or importlib.util.find_spec("pycocotools"):
        model.eval()
        with torch.inference_mode():
            boxes, scores, labels, _ = BoxDecoder(stride, (128, 128), top_k=20)(model(batch["image"]).localization)
        metric = BoxMeanAP(names)
        metric.update(boxes, scores, labels, batch["boxes"], batch["labels"], batch["box_mask"])
        r = metric.compute()
        print({k: round(v, 3) for k, v in r.items() if not k.startswith("ap")})
        assert r["map_50"] > 0.5  # the training images' own boxes come back from the decoder


def test_box_map_extra_iou_threshold_counts_a_loose_box() -> None:
    """A box overlapping its target at IoU 0.4 is a hit at 0.33 (DeepPCB's criterion), a miss at 0.5."""
    from lineside.fusion.detection_metrics import BoxMeanAP, coco_backend

    try:
        coco_backend()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    with pytest.raises(ValueError, match="IoU"):
        BoxMeanAP(["a"], extra_iou_thresholds=(1.5,))
    metric = BoxMeanAP(["a"], extra_iou_thresholds=(0.33,))
    target = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    # [0, 0, 10, 4] inside the 10x10 target: IoU 40 / 100 = 0.4
    pred = torch.tensor([[[0.0, 0.0, 10.0, 4.0]]])
    metric.update(pred, torch.tensor([[0.9]]), torch.tensor([[0]]), target, torch.tensor([[0]]), torch.tensor([[True]]))
    r = metric.compute()
    assert r["map_50"] == pytest.approx(0.0)
    assert r["map_33"] == pytest.approx(1.0) and r["ap_33/a"] == pytest.approx(1.0)
    metric.reset()
    far = torch.tensor([[[20.0, 20.0, 30.0, 30.0]]])
    metric.update(far, torch.tensor([[0.9]]), torch.tensor([[0]]), target, torch.tensor([[0]]), torch.tensor([[True]]))
    assert metric.compute()["map_33"] == pytest.approx(0.0)
