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
