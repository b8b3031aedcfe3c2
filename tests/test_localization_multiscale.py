"""Multi-scale CenterNet grid: ``LocalizationHead(in_channels=…)`` walks the fused tokens of its level
down the image encoder's backbone maps (FPN-style) and predicts on the finest map's grid; the
task, criterion and box decoder follow that grid's stride; the whole model still exports to ONNX."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lineside.fusion.box_decoder import BoxDecoder
from lineside.fusion.fusion_transformer import FusionTransformer
from lineside.fusion.localization_criterion import LocalizationCriterion
from lineside.fusion.localization_head import LocalizationHead
from lineside.fusion.model import InspectionModel
from lineside.vision.image_encoder import ImageEncoder
from test_localization import C, D, batch_targets, synthetic_fused


def _with_maps(image, b: int, channels=(12, 20), sizes=((16, 16), (8, 8))):
    maps = tuple(torch.randn(b, c, h, w) for c, (h, w) in zip(channels, sizes))
    return image._replace(maps=maps)


def test_multiscale_head_predicts_on_the_finest_map_grid() -> None:
    torch.manual_seed(0)
    fused, image = synthetic_fused()  # fused levels (8, 8), (4, 4)
    image = _with_maps(image, 2)
    head = LocalizationHead(D, C, level_index=0, hidden=16, in_channels=[12, 20])
    out = head(fused, image)
    assert out.heatmap.shape == (2, C, 16, 16) and out.size.shape == (2, 2, 16, 16)
    assert out.offset.shape == (2, 2, 16, 16) and out.defect.shape == (2, 1, 16, 16)
    # the coarse level starts the walk as well: 4×4 tokens → 8×8 map → 16×16 map
    assert LocalizationHead(D, C, level_index=1, hidden=16, in_channels=[12, 20])(fused, image).heatmap.shape == (2, C, 16, 16)
    # the fine map matters: changing it changes the output
    changed = head(fused, image._replace(maps=(image.maps[0] + 1.0, image.maps[1])))
    assert not torch.allclose(changed.heatmap, out.heatmap)
    with pytest.raises(ValueError, match="channels"):
        head(fused, _with_maps(synthetic_fused()[1], 2, channels=(12, 21)))
    with pytest.raises(ValueError, match="channels"):
        head(fused, image._replace(maps=()))


def test_single_level_head_is_unchanged() -> None:
    """No ``in_channels``: no new parameters (old checkpoints load), the level's own grid and stride."""
    plain = LocalizationHead(D, C, level_index=0, hidden=16)
    assert not any(k.startswith("lateral") for k in plain.state_dict())
    multi = LocalizationHead(D, C, level_index=0, hidden=16, in_channels=[12])
    assert {k for k in multi.state_dict() if k.startswith("lateral")} == {"lateral.0.weight", "lateral.0.bias"}
    multi.load_state_dict({**plain.state_dict(), **{k: v for k, v in multi.state_dict().items() if k.startswith("lateral")}})
    enc = ImageEncoder(backbone="test_efficientnet", pretrained=False, feature_levels=[-2, -1], embed_dim=D, dense_levels=[2])
    assert plain.grid_stride(enc) == float(enc.strides[0]) == 16.0
    assert multi.grid_stride(enc) == float(enc.map_strides[0]) == 8.0


def test_gradients_reach_the_lateral_and_the_tower() -> None:
    torch.manual_seed(1)
    fused, image = synthetic_fused(b=3, levels=((4, 4), (2, 2)))
    image = _with_maps(image, 3, channels=(12,), sizes=((8, 8),))  # 8×8 cells of stride 8 on 64 px
    maps = tuple(m.requires_grad_(True) for m in image.maps)
    head = LocalizationHead(D, C, level_index=0, hidden=16, in_channels=[12])
    losses = LocalizationCriterion(C, stride=8.0)(head(fused, image._replace(maps=maps)), batch_targets())
    losses["loss"].backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert maps[0].grad is not None and maps[0].grad.abs().sum() > 0  # the backbone's fine map is trained too


def tiny_multiscale_model() -> InspectionModel:
    encoder = ImageEncoder(backbone="test_efficientnet", pretrained=False, feature_levels=[-2, -1], embed_dim=32, dense_levels=[2])
    fusion = FusionTransformer(embed_dim=32, depth=1, dropout=0.0)
    head = LocalizationHead(32, C, level_index=0, hidden=16, in_channels=encoder.map_channels)
    return InspectionModel(encoder, fusion, localization_head=head)


def test_task_criterion_and_decoder_follow_the_fine_grid() -> None:
    from lineside.fusion.tasks.base import TaskSettings

    torch.manual_seed(2)
    model = tiny_multiscale_model().eval()
    out = model(torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8))
    assert out.localization.heatmap.shape == (2, C, 8, 8)  # stride 8 on 64 px, not the tokens' 4×4
    task = next(t for t in model.tasks if t.kind == "localization")
    assert task.stride == 8.0
    assert task.criterion().stride == 8.0
    settings = TaskSettings(top_k=10, train_size=(64, 64), input_size=(64, 64))
    decoder = task.box_decoder(settings)
    assert decoder.stride == 8.0
    boxes, scores, _, heat = decoder(out.localization)
    assert boxes.shape == (2, 10, 4) and scores.shape == (2, 10) and heat.shape == (2, 1, 8, 8)


class _ImageToBoxes(torch.nn.Module):
    def __init__(self, model: InspectionModel, decoder: BoxDecoder) -> None:
        super().__init__()
        self.model, self.decoder = model, decoder

    def forward(self, image):
        return self.decoder(self.model(image).localization)


def test_multiscale_model_exports_to_onnx_with_parity(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from lineside.export.trt_ops import unsupported_ops

    torch.manual_seed(4)
    model = tiny_multiscale_model().eval()
    decoder = BoxDecoder(model.localization_head.grid_stride(model.image_encoder), train_size=(64, 64), top_k=8)
    module = _ImageToBoxes(model, decoder).eval()
    image = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
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
    assert got[3].shape == (3, 1, 8, 8)  # the defect heatmap on the stride-8 grid
