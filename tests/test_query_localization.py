"""Query-based (DETR-style) localization: Hungarian matching on hand-made cases, the set criterion
(unlabelled samples add nothing), fixed-shape decoding, ONNX parity of a tiny model with the head,
InspectionModule picking the head's criterion and decoder, and a tiny CLI fit on NEU-DET."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lineside.fusion.fusion_transformer import FusionOutput, FusionTransformer
from lineside.fusion.lightning_module import InspectionModule
from lineside.fusion.model import InspectionModel
from lineside.fusion.query_localization_head import (
    CLASS_PRIOR_BIAS,
    QueryBoxDecoder,
    QueryLocalizationCriterion,
    QueryLocalizationHead,
    QueryLocalizationOutput,
    box_cxcywh_to_xyxy,
    generalized_box_iou,
    hungarian_match,
)
from lineside.vision.image_encoder import EncoderOutput, ImageEncoder

REPO = Path(__file__).resolve().parents[1]
D, C = 32, 3


def synthetic_fused(b: int = 2, levels=((8, 8), (4, 4)), extra_before: int = 3):
    n = sum(h * w for h, w in levels)
    tokens = torch.randn(b, extra_before + n, D)
    pos = []
    for h, w in levels:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        pos.append(torch.stack([ys, xs], -1).reshape(h * w, 2))
    positions = torch.cat(pos).expand(b, -1, -1)
    fused = FusionOutput(torch.randn(b, 1, D), tokens, torch.zeros(b, tokens.shape[1], dtype=torch.bool),
                         {"text": (0, extra_before), "image": (extra_before, extra_before + n)})
    return fused, EncoderOutput(torch.zeros(b, n, D), positions, torch.zeros(b, n, dtype=torch.bool), tuple(levels))


def batch_targets(size: int = 64) -> dict:
    """Sample 0: two boxes, sample 1: one box and a mask, sample 2: no box labels at all."""
    boxes = torch.zeros(3, 2, 4)
    labels = torch.full((3, 2), -1)
    box_mask = torch.zeros(3, 2, dtype=torch.bool)
    boxes[0, 0], labels[0, 0] = torch.tensor([4.0, 6.0, 20.0, 30.0]), 1
    boxes[0, 1], labels[0, 1] = torch.tensor([32.0, 40.0, 64.0, 48.0]), 2
    boxes[1, 0], labels[1, 0] = torch.tensor([8.0, 8.0, 24.0, 16.0]), 0
    box_mask[0] = True
    box_mask[1, 0] = True
    mask = torch.zeros(3, size, size, dtype=torch.uint8)
    mask[1, 8:16, 8:24] = 1
    return {"boxes": boxes, "labels": labels, "box_mask": box_mask, "mask": mask,
            "has_mask": torch.tensor([False, True, False]), "has_boxes": torch.tensor([True, True, False]),
            "image": torch.zeros(3, 1, size, size, dtype=torch.uint8)}


def random_output(b: int = 3, q: int = 6, t: int = 10, layers: int = 2, seed: int = 0) -> QueryLocalizationOutput:
    g = torch.Generator().manual_seed(seed)
    return QueryLocalizationOutput(
        torch.randn(b, q, C, generator=g), torch.rand(b, q, 4, generator=g) * 0.5 + 0.1, torch.randn(b, 1, 8, 8, generator=g),
        torch.randn(layers - 1, b, q, C, generator=g), torch.rand(layers - 1, b, q, 4, generator=g) * 0.5 + 0.1,
        torch.randn(b, t, C, generator=g), torch.rand(b, t, 4, generator=g) * 0.5 + 0.1,
    )


def _cxcywh(xyxy: torch.Tensor, size: float = 64.0) -> torch.Tensor:
    x1, y1, x2, y2 = (xyxy / size).unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


# --------------------------------------------------------------------------- matching


def test_hungarian_match_hand_made() -> None:
    tgt_boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2]])
    tgt_labels = torch.tensor([1, 0])
    # query 2 sits on target 0 with its class, query 0 on target 1; query 1 is far from both
    boxes = torch.tensor([[0.71, 0.6, 0.3, 0.2], [0.5, 0.95, 0.05, 0.05], [0.2, 0.21, 0.1, 0.1]])
    logits = torch.full((3, 2), -4.0)
    logits[2, 1] = logits[0, 0] = 3.0
    q, t = hungarian_match(logits, boxes, tgt_labels, tgt_boxes)
    assert q.tolist() == [0, 2] and t.tolist() == [1, 0]
    # the class cost decides between two queries on the same box
    boxes2 = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]])
    logits2 = torch.tensor([[3.0, -4.0], [-4.0, 3.0]])  # query 1 says class 1
    q, t = hungarian_match(logits2, boxes2, tgt_labels[:1], tgt_boxes[:1])
    assert q.tolist() == [1] and t.tolist() == [0]
    # no targets: nothing matched
    q, t = hungarian_match(logits, boxes, tgt_labels[:0], tgt_boxes[:0])
    assert q.numel() == 0 and t.numel() == 0


def test_generalized_box_iou_known_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0], [3.0, 0.0, 4.0, 1.0]])
    g = generalized_box_iou(a, b)[0]
    assert g[0] == pytest.approx(1.0) and g[1] == pytest.approx(1 / 3)
    assert g[2] == pytest.approx(0 - (8 - 5) / 8)  # disjoint: hull 4×2 = 8, union 5


# --------------------------------------------------------------------------- criterion


def test_criterion_perfect_vs_random() -> None:
    targets = batch_targets()
    crit = QueryLocalizationCriterion(C)
    rand = random_output()
    perfect_boxes, perfect_logits = rand.boxes.clone(), torch.full_like(rand.logits, -12.0)
    for i in range(2):
        for j in range(int(targets["box_mask"][i].sum())):
            perfect_boxes[i, j] = _cxcywh(targets["boxes"][i, j])
            perfect_logits[i, j, targets["labels"][i, j]] = 12.0
    perfect = rand._replace(logits=perfect_logits, boxes=perfect_boxes,
                            aux_logits=perfect_logits[None], aux_boxes=perfect_boxes[None])
    r, p = crit(rand, targets), crit(perfect, targets)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0",
            "loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "loss_defect", "loss"} == set(r)
    for k in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"):
        assert p[k] < 1e-5, k
    assert p["loss_ce"] < 1e-3 * r["loss_ce"]
    assert torch.isclose(r["loss"], sum(crit._weight(k) * v for k, v in r.items() if k != "loss"))
    # weight_dict: a suffixed name overrides one set, a zero weight drops the term, unknown names fail
    only = QueryLocalizationCriterion(C, weight_dict={"loss_ce": 1.0, "loss_ce_enc": 0.0})
    assert set(only(rand, targets)) == {"loss_ce", "loss_ce_0", "loss"}
    with pytest.raises(ValueError, match="loss_heatmap"):
        QueryLocalizationCriterion(C, weight_dict={"loss_heatmap": 1.0})


def test_defect_target_from_mask_and_boxes() -> None:
    crit = QueryLocalizationCriterion(C)
    t = crit.prepare_targets(random_output(), batch_targets())
    assert t["labelled"].tolist() == [True, True, False]
    # 64 px on an 8×8 grid: cells of 8 px; sample 1 from its mask, sample 0 from box interiors
    assert t["defect"][1, 0, 1, 1:3].tolist() == [1.0, 1.0] and t["defect"][1, 0, 1, 3] == 0
    assert t["defect"][0, 0, 0, 0] == pytest.approx(0.5 * 0.25) and t["defect"][0, 0, 5, 4] == 1.0
    labels, boxes = t["targets"][0]
    assert labels.tolist() == [1, 2] and torch.allclose(boxes[1], torch.tensor([0.75, 0.6875, 0.5, 0.125]))


def test_unlabelled_samples_add_no_loss_or_gradient() -> None:
    targets = batch_targets()
    crit = QueryLocalizationCriterion(C)
    out = random_output(seed=1)
    full = crit(out, targets)
    first_two = crit(QueryLocalizationOutput(*(x[:, :2] if name.startswith("aux") else x[:2] for name, x in out._asdict().items())),
                     {k: v[:2] for k, v in targets.items()})
    for name in full:
        assert torch.isclose(full[name], first_two[name]), name
    params = [x.clone().requires_grad_(True) for x in out]
    crit(QueryLocalizationOutput(*params), targets)["loss"].backward()
    for name, p in zip(out._fields, params):  # the third sample's outputs get no gradient
        third = p.grad[:, 2] if name.startswith("aux") else p.grad[2]
        assert third.abs().sum() == 0
    assert params[0].grad[:2].abs().sum() > 0 and params[1].grad[:2].abs().sum() > 0
    # nothing labelled at all: an exact zero with a graph
    params = [x.clone().requires_grad_(True) for x in out]
    none = crit(QueryLocalizationOutput(*params), {**targets, "has_boxes": torch.zeros(3, dtype=torch.bool),
                                                   "box_mask": torch.zeros(3, 2, dtype=torch.bool),
                                                   "has_mask": torch.zeros(3, dtype=torch.bool)})
    assert none["loss"] == 0
    none["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in params)


def test_defect_free_labelled_sample_trains_queries_to_background() -> None:
    targets = batch_targets()
    targets["box_mask"][:] = False  # sample 0 and 1 labelled, no boxes: defect-free images
    crit = QueryLocalizationCriterion(C)
    out = random_output(seed=2)
    losses = crit(out, targets)
    assert losses["loss_ce"] > 0 and losses["loss_bbox"] == 0 and losses["loss_giou"] == 0
    assert torch.isfinite(losses["loss"])


# --------------------------------------------------------------------------- head


@pytest.mark.parametrize("two_stage", [True, False])
def test_head_shapes_and_gradients(two_stage: bool) -> None:
    torch.manual_seed(0)
    fused, image = synthetic_fused(b=3)
    head = QueryLocalizationHead(D, C, num_queries=12, num_layers=2, num_heads=2, two_stage=two_stage)
    out = head(fused, image)
    assert out.logits.shape == (3, 12, C) and out.boxes.shape == (3, 12, 4) and out.defect.shape == (3, 1, 8, 8)
    assert out.aux_logits.shape == (1, 3, 12, C) and out.aux_boxes.shape == (1, 3, 12, 4)
    assert out.enc_logits.shape == ((3, 80, C) if two_stage else (3, 0, C))
    assert ((out.boxes > 0) & (out.boxes < 1)).all()
    assert torch.allclose(head.class_heads[-1].bias, torch.full((C,), CLASS_PRIOR_BIAS))
    if not two_stage:  # learned anchors start on a grid
        assert torch.allclose(out.boxes[0, 0], torch.tensor([0.125, 0.125, 0.1, 0.1]), atol=1e-4)
    # box heads start at zero (boxes = references); give them weights so every parameter is checked
    for m in [*head.box_heads, *([head.enc_box] if two_stage else [])]:
        torch.nn.init.normal_(m[-1].weight, std=0.01)
    losses = QueryLocalizationCriterion(C)(head(fused, image), batch_targets())
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    with pytest.raises(ValueError, match="num_queries"):
        QueryLocalizationHead(D, C, num_queries=200, num_heads=2)(fused, image)


def test_head_checkpoint_keys_are_stable() -> None:
    """Checkpoints written before the head's criterion, matcher and decoder moved to their own files
    load: the head's state_dict keys are exactly these."""
    expected = {
        *(f"{m}.{i}.{p}" for m in ("memory_proj", "content_proj") for i in (0, 1) for p in ("weight", "bias")),
        *(f"{m}.{i}.{p}" for m in ("pos_mlp", "defect") for i in (0, 2) for p in ("weight", "bias")),
        *(f"{m}.{i}.{p}" for m in ("box_heads.0", "enc_box") for i in (0, 2, 4) for p in ("weight", "bias")),
        *(f"{m}.{p}" for m in ("class_heads.0", "enc_class") for p in ("weight", "bias")),
        *(f"layers.0.{a}.{p}" for a in ("self_attn", "cross_attn")
          for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")),
        *(f"layers.0.{m}.{p}" for m in ("ff.0", "ff.3", "norm1", "norm2", "norm3") for p in ("weight", "bias")),
    }
    two_stage = QueryLocalizationHead(D, C, num_queries=4, num_layers=1, num_heads=2)
    assert set(two_stage.state_dict()) == expected
    learned = QueryLocalizationHead(D, C, num_queries=4, num_layers=1, num_heads=2, two_stage=False)
    two_stage_only = {k for k in expected if k.startswith(("enc_", "content_proj"))}
    assert set(learned.state_dict()) == (expected - two_stage_only) | {"query_anchor.weight", "query_content.weight"}
    learned.load_state_dict(QueryLocalizationHead(D, C, num_queries=4, num_layers=1, num_heads=2, two_stage=False).state_dict())


def test_moved_names_import_from_the_head_module() -> None:
    """The config class paths and older imports (``…query_localization_head.X``) name the same objects."""
    import lineside.fusion.query_localization_head as old
    from lineside.fusion import box_ops, box_targets, hungarian_matcher, query_box_decoder, query_localization_criterion

    assert old.QueryLocalizationCriterion is query_localization_criterion.QueryLocalizationCriterion
    assert old.QueryBoxDecoder is query_box_decoder.QueryBoxDecoder
    assert old.hungarian_match is hungarian_matcher.hungarian_match
    assert old.box_coverage is box_targets.box_coverage
    for name in ("box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "generalized_box_iou", "inverse_sigmoid"):
        assert getattr(old, name) is getattr(box_ops, name), name
    assert set(old.__all__) <= set(dir(old))
    cxcywh = torch.tensor([[0.5, 0.25, 0.2, 0.1]])
    assert torch.allclose(box_ops.box_cxcywh_to_xyxy(cxcywh), torch.tensor([[0.4, 0.2, 0.6, 0.3]]))
    assert torch.allclose(box_ops.box_xyxy_to_cxcywh(box_ops.box_cxcywh_to_xyxy(cxcywh)), cxcywh)
    assert torch.allclose(box_ops.inverse_sigmoid(torch.tensor([0.5, 0.0, 1.0])).sigmoid(), torch.tensor([0.5, 1e-5, 1 - 1e-5]))


# --------------------------------------------------------------------------- shared box targets and image levels


def test_padded_box_targets_validity_and_labelled() -> None:
    from lineside.fusion.box_targets import padded_box_targets

    boxes = torch.tensor([[[0.0, 0, 8, 8], [4, 4, 4, 9], [0, 0, 8, 8], [0, 0, 8, 8]],  # zero width; class 3 ≥ C; class -1
                          [[0.0, 0, 8, 8], [0, 0, 8, 8], [0, 0, 0, 0], [0, 0, 0, 0]]])  # padding
    labels = torch.tensor([[0, 1, 3, -1], [2, 0, 0, 0]])
    box_mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    t = padded_box_targets({"boxes": boxes, "labels": labels, "box_mask": box_mask}, 2, C, torch.device("cpu"))
    assert t.valid.tolist() == [[True, False, False, False], [True, False, False, False]]
    assert t.labelled.tolist() == [True, True] and t.boxes.dtype == torch.float32
    none = {"boxes": boxes, "labels": labels, "box_mask": torch.zeros_like(box_mask), "has_boxes": torch.tensor([False, True])}
    assert padded_box_targets(none, 2, C, torch.device("cpu")).labelled.tolist() == [False, True]
    some = {**none, "box_mask": box_mask, "has_boxes": torch.tensor([False, False])}  # a valid box makes a sample labelled
    assert padded_box_targets(some, 2, C, torch.device("cpu")).labelled.tolist() == [True, True]


def test_both_localization_criteria_read_targets_alike() -> None:
    """The CenterNet and the query criterion share one reading of the batch: the same defect target
    (mask where there is one, else box coverage) and the same labelled samples on the same grid."""
    from lineside.fusion.localization_criterion import LocalizationCriterion
    from lineside.fusion.localization_head import LocalizationOutput

    targets = batch_targets()
    targets["labels"][0, 1] = C  # out of range: left out by both
    query = QueryLocalizationCriterion(C).prepare_targets(random_output(), targets)
    grid = torch.zeros(3, C, 8, 8)
    centre = LocalizationCriterion(C).build_targets(LocalizationOutput(grid, grid[:, :2], grid[:, :2], grid[:, :1]), targets)
    assert torch.equal(query["defect"], centre["defect"]) and torch.equal(query["labelled"], centre["labelled"])
    assert query["labelled"].tolist() == [True, True, False]
    assert query["targets"][0][0].tolist() == [1] and centre["box_valid"][0].tolist() == [True, False]
    assert query["defect"][0, 0, 5, 4] == 0  # the left-out box adds no coverage
    with pytest.raises(ValueError, match="image_size"):
        QueryLocalizationCriterion(C).prepare_targets(random_output(), {k: v for k, v in targets.items() if k not in ("image", "mask")})
    sized = {k: v for k, v in targets.items() if k not in ("image", "mask")} | {"image_size": (64, 64)}
    assert torch.equal(QueryLocalizationCriterion(C).prepare_targets(random_output(), sized)["targets"][0][1], query["targets"][0][1])


def test_level_tokens_picks_each_level() -> None:
    from lineside.fusion.image_levels import image_span, level_slice, level_tokens

    fused, image = synthetic_fused(b=2, levels=((4, 4), (2, 2)), extra_before=3)
    assert image_span(fused, image) == (3, 23, ((4, 4), (2, 2)))
    assert level_slice(((4, 4), (2, 2)), 1) == level_slice(((4, 4), (2, 2)), -1) == (16, 2, 2)
    fine, h, w = level_tokens(fused, image, 0)
    assert (h, w) == (4, 4) and torch.equal(fine, fused.tokens[:, 3:19])
    coarse, h, w = level_tokens(fused, image, -1)
    assert (h, w) == (2, 2) and torch.equal(coarse, fused.tokens[:, 19:23])
    with pytest.raises(IndexError, match="level_index 2"):
        level_tokens(fused, image, 2)
    with pytest.raises(ValueError, match="image span 3:23 holds 20 tokens"):
        level_tokens(fused, image._replace(levels=((4, 4),)), 0)
    head = QueryLocalizationHead(D, C, num_queries=4, num_heads=2, level_index=-1)
    assert head(fused, image).defect.shape == (2, 1, 2, 2)  # the heatmap on the coarsest grid


# --------------------------------------------------------------------------- decoder


def test_decoder_known_queries_to_pixel_boxes() -> None:
    logits = torch.full((1, 4, C), -9.0)
    logits[0, 2, 1] = 3.0  # best: query 2, class 1
    logits[0, 0, 2] = 1.0  # second: query 0, class 2
    boxes = torch.tensor([[[0.5, 0.5, 0.25, 0.5], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.25], [0.9, 0.9, 0.1, 0.1]]])
    out = QueryLocalizationOutput(logits, boxes, torch.zeros(1, 1, 4, 4), torch.zeros(0, 1, 4, C), torch.zeros(0, 1, 4, 4),
                                  torch.zeros(1, 0, C), torch.zeros(1, 0, 4))
    dec = QueryBoxDecoder(stride=16, train_size=(64, 64), input_size=(128, 64), top_k=5)
    b, s, lab, heat = dec(out)
    assert b.shape == (1, 5, 4) and s.shape == (1, 5) and lab.shape == (1, 5) and heat.shape == (1, 1, 4, 4)
    assert lab.dtype == torch.int64 and (s[0, :-1] >= s[0, 1:]).all()
    assert lab[0, :2].tolist() == [1, 2] and s[0, 0] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    # query 2: x 0..32 px, y 40..56 px of 64 → input frame twice as tall
    assert torch.allclose(b[0, 0], torch.tensor([0.0, 80.0, 32.0, 112.0]))
    assert torch.allclose(b[0, 1], torch.tensor([24.0, 32.0, 40.0, 96.0]))
    assert torch.allclose(heat, torch.full_like(heat, 0.5))
    assert [spec.name for spec in dec.outputs()] == ["boxes", "box_scores", "box_labels", "defect_heatmap"]
    assert dec.outputs()[3].shape == ("N", 1, 4, 4)
    # test-time views: only the first (identity) view's rows are decoded
    tta = QueryBoxDecoder(16, (64, 64), top_k=5, tta_views=2)
    doubled = QueryLocalizationOutput(*(torch.cat([x, x.flip(0)], 0) if x.shape[0] == 1 else x for x in out))
    assert tta(doubled)[0].shape == (1, 5, 4)
    with pytest.raises(ValueError, match="top_k"):
        QueryBoxDecoder(16, (64, 64), top_k=13)(out)


# --------------------------------------------------------------------------- the whole model


def tiny_model(num_queries: int = 10) -> InspectionModel:
    encoder = ImageEncoder(backbone="test_efficientnet", pretrained=False, feature_levels=[-2, -1], embed_dim=D, in_chans=1)
    fusion = FusionTransformer(embed_dim=D, depth=1, dropout=0.0)
    return InspectionModel(encoder, fusion, localization_head=QueryLocalizationHead(D, C, num_queries=num_queries, num_heads=2))


class _ImageToBoxes(torch.nn.Module):
    def __init__(self, model: InspectionModel, decoder: QueryBoxDecoder) -> None:
        super().__init__()
        self.model, self.decoder = model, decoder

    def forward(self, image):
        return self.decoder(self.model(image).localization)


def test_model_with_query_head_exports_image_to_boxes(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from lineside.export.trt_ops import unsupported_ops

    torch.manual_seed(4)
    model = tiny_model().eval()
    for m in model.localization_head.box_heads:  # non-trivial boxes (the box heads start at zero)
        torch.nn.init.normal_(m[-1].weight, std=0.05)
    image = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    stride = model.image_encoder.strides[model.localization_head.level_index]
    decoder = model.localization_head.decoder(stride, (64, 64), top_k=8)
    assert isinstance(decoder, QueryBoxDecoder)
    module = _ImageToBoxes(model, decoder).eval()
    path = tmp_path / "query_boxes.onnx"
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
        if spec.kind in ("float", "box_score"):
            np.testing.assert_allclose(g, w, atol=1e-4, err_msg=spec.name)
    assert [s.kind for s in decoder.outputs()] == ["box", "box_score", "box_label", "float"]  # compared as detections by parity
    assert np.abs(got[0] - want[0]).max() < 0.5  # boxes within half a pixel
    assert (got[2] == want[2]).mean() > 0.9  # labels: near-tied scores may swap places
    assert [tuple(g.shape[1:]) for g in got] == [(8, 4), (8,), (8,), (1, 4, 4)]


def test_inspection_module_uses_the_query_tasks_criterion_and_decoder() -> None:
    torch.manual_seed(5)
    module = InspectionModule(tiny_model(), top_k=20)
    assert [type(t).__name__ for t in module.model.tasks] == ["QueryLocalizationTask"]
    assert isinstance(module.criteria["localization"], QueryLocalizationCriterion)
    batch = batch_targets()
    batch["image"] = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    losses = module._losses(module.model(batch["image"]), batch)
    assert torch.isfinite(losses["loss"]) and "loss_ce" in losses and "loss_localization" in losses
    decoder = module.deployable(batch).box_decoder
    assert isinstance(decoder, QueryBoxDecoder) and decoder.top_k == 20
    out = module.decode(batch)
    boxes, heat = out["boxes"], out["defect_heatmap"]
    assert boxes.shape == (3, 20, 4) and heat.shape == (3, 1, 4, 4)
    assert (boxes >= 0).all() and (boxes <= 64).all()


@pytest.mark.needs_shared
def test_tiny_cli_fit_with_query_head(tmp_path, shared_data) -> None:
    from lineside.fusion.training_cli import main

    if not (shared_data / "neu_det").is_dir():
        pytest.skip(f"{shared_data / 'neu_det'} is absent")
    cfg = yaml.safe_load((REPO / "configs" / "tiny_det.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    cfg["model"]["model"]["init_args"]["localization_head"] = {
        "class_path": "lineside.fusion.query_localization_head.QueryLocalizationHead",
        "init_args": {"embed_dim": 32, "num_classes": 6, "num_queries": 10, "num_heads": 2}}
    cfg["model"]["localization_criterion"] = {
        "class_path": "lineside.fusion.query_localization_head.QueryLocalizationCriterion",
        "init_args": {"num_classes": 6, "weight_dict": {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}}}
    path = tmp_path / "tiny_query.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    metrics = list((tmp_path / "run").rglob("metrics.csv"))
    assert metrics, "no metrics.csv written"
    header = metrics[0].read_text().splitlines()[0].split(",")
    assert "val/map_50" in header and "train/loss_ce_enc" in header and "train/loss_defect" not in header
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
