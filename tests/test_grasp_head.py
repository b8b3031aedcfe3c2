"""Grasp suggestion: head shapes and frames, criterion (perfect predictions, empty samples, gradients),
decoder (ranking, 3-D NMS, sensor frame) and its ONNX export with parity and TensorRT operators."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lineside.fusion.fusion_transformer import FusionOutput
from lineside.fusion.grasp_criterion import GraspCriterion
from lineside.fusion.grasp_decoder import GraspDecoder
from lineside.fusion.grasp_head import GraspHead, GraspOutput, orthonormal_grasp_axes
from lineside.pointcloud.point_encoder import EncoderOutput

D, G = 32, 16


class _FusedWithSpans(NamedTuple):
    """FusionOutput plus ``spans`` (used while the fusion transformer does not yet report spans)."""

    queries: Tensor
    tokens: Tensor
    padding_mask: Tensor
    spans: dict


def _fused(b: int = 2, image_tokens: int = 5, seed: int = 0):
    """Fused tokens of an image (5 tokens, name order first) and G point tokens, with spans."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, image_tokens + G, D, generator=g)
    mask = torch.zeros(b, image_tokens + G, dtype=torch.bool)
    mask[1, -3:] = True  # sample 1: its last 3 point groups are padding
    spans = {"image": (0, image_tokens), "points": (image_tokens, image_tokens + G)}
    q = torch.randn(b, 1, D, generator=g)
    fused = FusionOutput(q, tokens, mask, spans) if "spans" in FusionOutput._fields else _FusedWithSpans(q, tokens, mask, spans)
    centres = torch.rand(b, G, 3, generator=g) * 2 - 1
    points = EncoderOutput(tokens[:, image_tokens:], centres, mask[:, image_tokens:])
    return fused, points


def test_head_shapes_unit_orthogonal_axes_and_point_span():
    torch.manual_seed(0)
    head = GraspHead(D)
    fused, points = _fused()
    out = head(fused, points)
    assert isinstance(out, GraspOutput)
    assert out.logits.shape == (2, G) and out.width.shape == (2, G) and out.padding_mask.shape == (2, G)
    for t in (out.position, out.approach, out.closing, out.centres):
        assert t.shape == (2, G, 3) and torch.isfinite(t).all()
    torch.testing.assert_close(out.approach.norm(dim=-1), torch.ones(2, G))
    torch.testing.assert_close(out.closing.norm(dim=-1), torch.ones(2, G))
    assert (out.approach * out.closing).sum(-1).abs().max() < 1e-5
    assert (out.width > 0).all()
    assert (out.position - out.centres).abs().max() <= head.offset_scale + 1e-6
    assert out.padding_mask[1, -3:].all() and not out.padding_mask[0].any()
    # the head reads exactly the point span: changing image tokens changes nothing
    fused2 = fused._replace(tokens=torch.cat([fused.tokens[:, :5] + 7.0, fused.tokens[:, 5:]], 1))
    torch.testing.assert_close(head(fused2, points).position, out.position)
    with pytest.raises(KeyError):
        head(_FusedWithSpans(fused.queries, fused.tokens, fused.padding_mask, {"image": (0, 5)}), points)


def test_orthonormal_axes_survive_parallel_raw_vectors():
    a = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [0.3, -0.2, 0.9]])
    ap, cl = orthonormal_grasp_axes(a, 3 * a)  # closing parallel to approach
    assert torch.isfinite(cl).all()
    torch.testing.assert_close(cl.norm(dim=-1), torch.ones(3))
    assert (ap * cl).sum(-1).abs().max() < 1e-6


def _gt_batch():
    """Sample 0: 3 grasps; sample 1: none (grasp_mask all False)."""
    grasps = torch.zeros(2, 4, 11)
    pos = torch.tensor([[0.2, 0.0, 0.0], [-0.3, 0.1, 0.2], [0.0, -0.5, 0.1]])
    app = torch.nn.functional.normalize(torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]), dim=-1)
    clo = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    grasps[0, :3, 0:3], grasps[0, :3, 3:6], grasps[0, :3, 6:9], grasps[0, :3, 9] = pos, app, clo, torch.tensor([0.3, 0.5, 0.2])
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, :3] = True
    return grasps, mask


def _perfect_outputs(grasps: Tensor) -> GraspOutput:
    """Tokens 0-2 sit on the 3 grasps and predict them exactly (closing sign flipped); tokens 3-5 are far."""
    b, g = 2, 6
    centres = torch.full((b, g, 3), 5.0)
    centres[:, :3] = grasps[0, :3, 0:3] + 0.01
    position = centres.clone()
    position[:, :3] = grasps[0, :3, 0:3]
    approach = torch.zeros(b, g, 3)
    approach[..., 2] = 1.0
    closing = torch.zeros(b, g, 3)
    closing[..., 0] = 1.0
    approach[:, :3], closing[:, :3] = grasps[0, :3, 3:6], -grasps[0, :3, 6:9]
    width = torch.ones(b, g)
    width[:, :3] = grasps[0, :3, 9]
    logits = torch.full((b, g), -8.0)
    logits[:, :3] = 8.0
    return GraspOutput(logits, position, approach, closing, width, centres, torch.zeros(b, g, dtype=torch.bool))


def test_criterion_perfect_predictions_give_zero_losses():
    grasps, mask = _gt_batch()
    crit = GraspCriterion(radius=0.1)
    losses = crit(_perfect_outputs(grasps), {"grasps": grasps, "grasp_mask": mask})
    assert set(losses) == {"loss", "loss_graspability", "loss_center", "loss_approach", "loss_closing", "loss_width"}
    for name in ("loss_center", "loss_approach", "loss_closing", "loss_width"):
        assert losses[name].item() == pytest.approx(0.0, abs=1e-6), name
    assert losses["loss_graspability"].item() < 1e-4
    # a wrong approach and width are penalised
    bad = _perfect_outputs(grasps)
    bad = bad._replace(approach=-bad.approach, width=bad.width + 0.1)
    worse = crit(bad, {"grasps": grasps, "grasp_mask": mask})
    assert worse["loss_approach"].item() == pytest.approx(2.0, abs=1e-5)
    assert worse["loss_width"].item() == pytest.approx(0.1, abs=1e-5)


def test_criterion_matches_the_best_of_several_grasps_at_one_spot():
    grasps, mask = _gt_batch()
    grasps[0, 3] = grasps[0, 0]
    grasps[0, 3, 3:6] = -grasps[0, 0, 3:6]  # same centre, opposite approach
    mask[0, 3] = True
    out = _perfect_outputs(grasps)
    for flip in (1.0, -1.0):
        o = out._replace(approach=torch.cat([out.approach[:, :1] * flip, out.approach[:, 1:]], 1))
        assert GraspCriterion(radius=0.1)(o, {"grasps": grasps, "grasp_mask": mask})["loss_approach"].item() < 1e-6


def test_empty_samples_and_padded_tokens_contribute_nothing():
    grasps, mask = _gt_batch()
    crit = GraspCriterion(radius=0.1)
    out = _perfect_outputs(grasps)
    noisy = {f: getattr(out, f).clone().requires_grad_(f != "padding_mask" and f != "centres") for f in GraspOutput._fields}
    noisy["position"].data[0, :3] += 0.05
    noisy["logits"].data[1] = torch.randn(6)  # sample 1 has no grasps: anything goes
    o = GraspOutput(**noisy)
    both = crit(o, {"grasps": grasps, "grasp_mask": mask})
    first = crit(GraspOutput(*(t[:1] for t in o)), {"grasps": grasps[:1], "grasp_mask": mask[:1]})
    for k in both:
        torch.testing.assert_close(both[k], first[k])
    both["loss"].backward()
    for f in ("logits", "position", "approach", "closing", "width"):
        assert noisy[f].grad[1].abs().max() == 0, f
    assert noisy["position"].grad[0].abs().max() > 0
    # a padded token that would be positive changes nothing
    pm = torch.zeros(2, 6, dtype=torch.bool)
    pm[0, 2] = True
    padded = crit(o._replace(padding_mask=pm, width=o.width.detach().clone().index_put_((torch.tensor([0]), torch.tensor([2])), torch.tensor([9.0]))), {"grasps": grasps, "grasp_mask": mask})
    assert padded["loss_width"].item() < 1e-5
    # a batch without any grasp: zero loss with a graph
    none = crit(o, {"grasps": grasps, "grasp_mask": torch.zeros_like(mask)})
    assert none["loss"].item() == 0.0 and none["loss"].requires_grad


def test_gradients_reach_every_head_parameter():
    torch.manual_seed(0)
    head = GraspHead(D)
    fused, points = _fused()
    grasps = torch.zeros(2, 8, 11)
    grasps[:, :, 0:3] = points.positions[:, :8] + 0.02
    grasps[:, :, 3:6] = torch.nn.functional.normalize(torch.randn(2, 8, 3), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(2, 8, 3), dim=-1)
    grasps[:, :, 6:9] = torch.nn.functional.normalize(c - (c * grasps[:, :, 3:6]).sum(-1, keepdim=True) * grasps[:, :, 3:6], dim=-1)
    grasps[:, :, 9] = 0.3
    mask = torch.ones(2, 8, dtype=torch.bool)
    losses = GraspCriterion(radius=0.1)(head(fused, points), {"grasps": grasps, "grasp_mask": mask})
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _hand_made(k: int = 3):
    """5 tokens: a padded one with the top logit, a best one, its near-duplicate (4 mm away), two far ones."""
    logits = torch.tensor([[9.0, 3.0, 2.9, 1.0, 2.0]])
    pos = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.004, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.2, 0.0]]])
    app = torch.tensor([[0.0, 0.0, 1.0]]).expand(1, 5, 3)
    clo = torch.tensor([[1.0, 0.0, 0.0]]).expand(1, 5, 3)
    width = torch.tensor([[0.5, 0.01, 0.02, 0.03, 0.04]])
    pad = torch.tensor([[True, False, False, False, False]])
    return logits, pos, app, clo, width, pad


def test_decoder_ranks_suppresses_near_duplicates_and_marks_exhausted_picks():
    logits, pos, app, clo, width, pad = _hand_made()
    dec = GraspDecoder(top_k=3, nms_radius=0.01)
    p, a, c, w, s = dec(logits, pos, app, clo, width, pad, torch.zeros(1, 3), torch.ones(1))
    assert p.shape == (1, 3, 3) and a.shape == c.shape == (1, 3, 3) and w.shape == s.shape == (1, 3)
    torch.testing.assert_close(w[0], torch.tensor([0.01, 0.04, 0.03]))  # best, then the far ones; duplicate and padding gone
    torch.testing.assert_close(s[0], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    p, a, c, w, s = GraspDecoder(top_k=5, nms_radius=0.01)(logits, pos, app, clo, width, pad, torch.zeros(1, 3), torch.ones(1))
    assert (s[0, 3:] == 0).all() and (s[0, :3] > 0).all()  # only 3 distinct grasps exist
    p, *_, s = GraspDecoder(top_k=4, nms_radius=0.001)(logits, pos, app, clo, width, pad, torch.zeros(1, 3), torch.ones(1))
    torch.testing.assert_close(p[0, 1], torch.tensor([0.004, 0.0, 0.0]))  # a smaller radius keeps it
    assert {spec.name for spec in dec.outputs()} == set(dec.output_names)
    assert all(spec.kind == "float" and spec.dtype == "float32" for spec in dec.outputs())


def test_decoder_goes_back_to_sensor_metres():
    logits, pos, app, clo, width, pad = _hand_made()
    center = torch.tensor([[0.1, -0.2, 0.45]])
    scale = torch.tensor([0.05])
    p, a, c, w, s = GraspDecoder(top_k=2, nms_radius=0.0001)(logits, pos, app, clo, width, pad, center, scale)
    torch.testing.assert_close(p[0, 0], center[0])
    torch.testing.assert_close(p[0, 1], pos[0, 2] * 0.05 + center[0])  # 0.2 mm apart in metres: not suppressed
    torch.testing.assert_close(w[0], torch.tensor([0.01, 0.02]) * 0.05)
    torch.testing.assert_close(a[0], app[0, :2])


class _HeadAndDecoder(nn.Module):
    """What a deployable graph runs after fusion: head on the point tokens, then the decoder."""

    def __init__(self):
        super().__init__()
        self.head = GraspHead(D)
        self.decoder = GraspDecoder(top_k=4, nms_radius=0.02)

    def forward(self, tokens, centres, padding_mask, center, scale):
        return self.decoder.decode(self.head.predict(tokens, centres, padding_mask), center, scale)


def test_onnx_export_matches_eager_and_uses_tensorrt_operators(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from lineside.export.trt_ops import unsupported_ops

    torch.manual_seed(0)
    model = _HeadAndDecoder().eval()

    def inputs(n, seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.zeros(n, G, dtype=torch.bool)
        mask[0, -4:] = True
        return (torch.randn(n, G, D, generator=g), torch.rand(n, G, 3, generator=g) * 2 - 1, mask,
                torch.randn(n, 3, generator=g) * 0.1 + torch.tensor([0.0, 0.0, 0.5]), torch.rand(n, generator=g) * 0.05 + 0.03)

    names = ["tokens", "centres", "padding_mask", "center", "scale"]
    batch = torch.export.Dim("N", min=1, max=1024)
    path = tmp_path / "grasp.onnx"
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs(2, 0), str(path), dynamo=True, opset_version=18, input_names=names,
                          output_names=model.decoder.output_names, dynamic_shapes={k: {0: batch} for k in names}, external_data=False)
    proto = onnx.load(str(path))
    assert unsupported_ops(proto) == {}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, seed in ((1, 1), (3, 2), (5, 3)):
        x = inputs(n, seed)
        with torch.no_grad():
            ref = [t.numpy() for t in model(*x)]
        got = sess.run(model.decoder.output_names, {k: v.numpy() for k, v in zip(names, x)})
        for name, r, o in zip(model.decoder.output_names, ref, got):
            assert o.shape == r.shape and o.dtype == np.float32, name
            np.testing.assert_allclose(o, r, atol=1e-5, rtol=0, err_msg=name)
