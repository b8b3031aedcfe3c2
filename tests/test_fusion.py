import pytest
import torch

from lineside.fusion import FusionTransformer, GradingCriterion, GradingHead, InspectionModel, predict_grades
from lineside.fusion.postprocess import dihedral_views
from lineside.vision.image_encoder import EncoderOutput, ImageEncoder


def test_padding_tokens_do_not_change_the_result():
    torch.manual_seed(0)
    fusion = FusionTransformer(16, depth=2, num_heads=2, dropout=0.0).eval()
    head = GradingHead(16, 3, dropout=0.0).eval()
    tokens, pos = torch.randn(1, 5, 16), torch.rand(1, 5, 2)
    mask = torch.zeros(1, 5, dtype=torch.bool)
    base = head(fusion({"image": EncoderOutput(tokens, pos, mask)}))
    padded = EncoderOutput(torch.cat([tokens, 100 * torch.randn(1, 3, 16)], 1), torch.cat([pos, torch.rand(1, 3, 2)], 1),
                           torch.cat([mask, torch.ones(1, 3, dtype=torch.bool)], 1))
    assert torch.allclose(head(fusion({"image": padded})), base, atol=1e-5)


def test_unknown_modality_is_refused():
    with pytest.raises(KeyError, match="points"):
        FusionTransformer(16, depth=1, num_heads=2)({"points": EncoderOutput(torch.zeros(1, 2, 16), torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.bool))})


def test_dihedral_views_are_the_eight_symmetries():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    v = dihedral_views(x, 8)
    assert v.shape == (8, 1, 3, 3)
    assert len({tuple(t.flatten().tolist()) for t in v}) == 8
    assert torch.equal(v[0], x[0])
    with pytest.raises(ValueError):
        dihedral_views(x, 3)


def test_tta_prediction_is_a_distribution():
    torch.manual_seed(0)
    model = InspectionModel(ImageEncoder("test_efficientnet", 16, pretrained=False), FusionTransformer(16, 1, 2), GradingHead(16, 4)).eval()
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        p1, p8 = predict_grades(model, x, 1), predict_grades(model, x, 8)
    for p in (p1, p8):
        assert torch.allclose(p.probs.sum(-1), torch.ones(2), atol=1e-5)
        assert torch.equal(p.grade, p.probs.argmax(-1))
    # TTA averages the 8 views: it equals the mean of per-view probabilities
    with torch.no_grad():
        views = torch.stack([model(dihedral_views(x, 8)[i * 2:(i + 1) * 2]).grade_logits.softmax(-1) for i in range(8)]).mean(0)
    assert torch.allclose(p8.probs, views, atol=1e-5)


def test_criterion_weights_ignore_missing_labels_and_order():
    crit = GradingCriterion(weight_dict={"loss_grade": 1.0, "loss_ordinal": 1.0})
    crit.set_class_counts([100, 25, 4, 50])
    w = crit.class_weights
    assert w[2] > w[1] > w[3] > w[0]  # rarer grades weigh more
    counts = torch.tensor([100.0, 25, 4, 50])
    assert torch.isclose((w * counts).sum() / counts.sum(), torch.tensor(1.0))
    logits = torch.tensor([[5.0, 0, 0, 0]])
    near = crit.loss_ordinal(logits, torch.tensor([1]))
    far = crit.loss_ordinal(logits, torch.tensor([3]))
    assert far > near > 0
    from lineside.fusion.model import InspectionOutput

    out = crit(InspectionOutput(torch.randn(3, 4, requires_grad=True)), {"grade": torch.tensor([-1, -1, -1])})
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    mixed = crit(InspectionOutput(torch.randn(3, 4)), {"grade": torch.tensor([-1, 2, 0])})
    assert torch.isfinite(mixed["loss"]) and mixed["loss"] > 0
    with pytest.raises(ValueError, match="unknown losses"):
        GradingCriterion(weight_dict={"loss_box": 1.0})


def _multimodal(with_text=False):
    from lineside.fusion import FusionTransformer, GradingHead, InspectionModel
    from lineside.pointcloud.point_encoder import PointEncoder
    from lineside.vision import ImageEncoder

    mods = {"image": 2, "points": 3} | ({"text": 1} if with_text else {})
    text = None
    if with_text:
        from lineside.fusion import TextEncoder

        text = TextEncoder(embed_dim=32)
    return InspectionModel(
        image_encoder=ImageEncoder("test_efficientnet", embed_dim=32, in_chans=1, feature_levels=[-2, -1], pretrained=False),
        fusion=FusionTransformer(embed_dim=32, depth=1, num_heads=2, dropout=0.0, modalities=mods),
        grading_head=GradingHead(32, 4),
        point_encoder=PointEncoder(embed_dim=32, num_groups=(16,), group_sizes=(8,), widths=((16, 32),), local_scales=(0.1,)),
        text_encoder=text,
    ).eval()


def test_modalities_are_optional_and_spans_locate_their_tokens():
    import torch

    model = _multimodal()
    image = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    points = torch.randn(2, 128, 3) * 0.05
    mask = torch.ones(2, 128, dtype=torch.bool)
    mask[1, 64:] = False
    enc = model.encode(image, points, mask)
    assert enc["image"].levels == ((4, 4), (2, 2))  # stride 16 and 32 grids of a 64 px image, in token order
    fused = model.fusion(enc)
    assert fused.spans == {"image": (0, 20), "points": (20, 36)}
    assert fused.tokens.shape == (2, 36, 32)
    both = model(image, points, mask)
    only_image = model(image)
    only_points = model(points=points, point_mask=mask)
    for out in (both, only_image, only_points):
        assert out.grade_logits.shape == (2, 4) and torch.isfinite(out.grade_logits).all()
        assert out.localization is None and out.grasp is None
    assert not torch.allclose(both.grade_logits, only_image.grade_logits), "the point tokens take part in the fusion"
    import pytest

    with pytest.raises(ValueError, match="point_mask"):
        model(points=points)
    with pytest.raises(ValueError, match="no modality given"):
        model()


def test_absent_text_equals_no_text_modality():
    import torch

    model = _multimodal(with_text=True)
    image = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        no_text = model(image).grade_logits
        empty = model(image, text=["", None]).grade_logits
        real = model(image, text=["monocrystalline", "polycrystalline"]).grade_logits
    torch.testing.assert_close(no_text, empty, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(real, no_text)


def test_model_configuration_errors_are_clear():
    import pytest

    from lineside.fusion import FusionTransformer, GradingHead, InspectionModel
    from lineside.pointcloud.point_encoder import PointEncoder

    with pytest.raises(ValueError, match="no 'points' modality"):
        InspectionModel(point_encoder=PointEncoder(embed_dim=32), fusion=FusionTransformer(embed_dim=32), grading_head=GradingHead(32, 2))
    with pytest.raises(ValueError, match="at least one encoder"):
        InspectionModel(fusion=FusionTransformer(embed_dim=32), grading_head=GradingHead(32, 2))
