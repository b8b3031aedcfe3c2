"""Task weighting (``model.task_weighting``): sum, fixed weights, uncertainty weighting with a clipped
log-variance term; the LightningModule's loss on a mixed batch follows it and trains the log-variances."""

from __future__ import annotations

import math

import pytest
import torch

from lineside.fusion.lightning_module import InspectionModule
from lineside.fusion.task_weighting import TaskWeighting

from test_multitask_data import _mixed_batch, _model


def _parts(module: InspectionModule, batch: dict) -> tuple[dict, dict]:
    losses = module._losses(module.model(batch["image"]), batch)
    return losses, {t: losses[f"loss_{t}"] for t in ("grading", "localization")}


def test_fixed_weights_scale_each_task_of_a_mixed_batch() -> None:
    module = InspectionModule(_model(), task_weighting="fixed", task_weights={"localization": 3.0})
    losses, parts = _parts(module, _mixed_batch())
    torch.testing.assert_close(losses["loss"], parts["grading"] + 3.0 * parts["localization"])
    assert float(losses["weight_localization"]) == 3.0 and float(losses["weight_grading"]) == 1.0
    plain, plain_parts = _parts(InspectionModule(_model()), _mixed_batch())
    torch.testing.assert_close(plain["loss"], plain_parts["grading"] + plain_parts["localization"])
    assert "weight_grading" not in plain


def test_uncertainty_weighting_value_gradient_and_optimizer() -> None:
    module = InspectionModule(_model(), task_weighting="uncertainty")
    log_vars = module.task_weighting.log_vars
    with torch.no_grad():
        log_vars["grading"].fill_(0.5)
        log_vars["localization"].fill_(-0.7)  # below the clip: its regulariser is held at 0
    losses, parts = _parts(module, _mixed_batch())
    want = math.exp(-0.5) * parts["grading"] + 0.5 + math.exp(0.7) * parts["localization"] + 0.0
    torch.testing.assert_close(losses["loss"], want)
    losses["loss"].backward()
    g = {t: float(log_vars[t].grad) for t in ("grading", "localization")}
    parts = {t: v.detach() for t, v in parts.items()}
    assert g["grading"] == pytest.approx(1 - math.exp(-0.5) * float(parts["grading"]), rel=1e-4)
    assert g["localization"] == pytest.approx(-math.exp(0.7) * float(parts["localization"]), rel=1e-4)  # clipped term: no +1
    groups = module.configure_optimizers().param_groups
    ids = {id(p) for group in groups for p in group["params"]}
    assert all(id(p) in ids for p in log_vars.values())
    assert any(k.startswith("task_weighting.log_vars.") for k in module.state_dict())


@pytest.mark.parametrize("loss, clip, weight", [(4.0, 0.0, 0.25), (0.25, float("-inf"), 4.0), (0.25, 0.0, 1.0)])
def test_uncertainty_weights_settle_at_the_inverse_loss_unless_clipped(loss: float, clip: float, weight: float) -> None:
    """exp(-s)·L + s is smallest at s = log L (weight 1/L); clipping the term at 0 holds the weight at ≤ 1."""
    w = TaskWeighting(["a"], "uncertainty", clip=clip)
    opt = torch.optim.SGD(w.parameters(), lr=0.05)
    for _ in range(2000):
        opt.zero_grad()
        total = w({"a": torch.tensor(loss)})
        total.backward()
        opt.step()
    assert float(w.weights()["a"]) == pytest.approx(weight, rel=0.02)
    assert clip == float("-inf") or float(total.detach()) >= 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="one of"):
        TaskWeighting(["a"], "gradnorm")
    with pytest.raises(ValueError, match="not tasks of the model"):
        TaskWeighting(["a"], "fixed", {"b": 2.0})
    with pytest.raises(ValueError, match="for task_weighting: fixed"):
        TaskWeighting(["a"], "uncertainty", {"a": 2.0})


def test_a_batch_of_another_data_set_logs_and_weighs_nothing_for_the_task() -> None:
    """Boxes only (every grade -1): no grading terms are logged, and uncertainty weighting neither adds
    the grading log-variance term nor moves it."""
    module = InspectionModule(_model(), task_weighting="uncertainty")
    batch = dict(_mixed_batch(), grade=torch.full((4,), -1))
    losses = module._losses(module.model(batch["image"]), batch)
    assert "loss_grading" not in losses and "loss_grade" not in losses and "weight_grading" not in losses
    torch.testing.assert_close(losses["loss"], losses["loss_localization"])  # exp(0) · L + max(0, 0)
    losses["loss"].backward()
    log_vars = module.task_weighting.log_vars
    assert float(log_vars["grading"].grad) == 0.0 and float(log_vars["localization"].grad) != 0.0
    assert module.model.grading_head.fc.weight.grad is not None  # the zero still reaches the head
