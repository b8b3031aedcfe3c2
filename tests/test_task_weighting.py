"""Task weighting (``model.task_weighting``): sum, fixed weights, uncertainty weighting with a clipped
log-variance term, GradNorm, UPGrad (torchjd); the LightningModule's loss on a mixed batch follows it
and trains the log-variances; every method fits the tiny multi-task config."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch

from lineside.fusion.lightning_module import InspectionModule
from lineside.fusion.task_weighting import TaskWeighting

from test_multitask_data import REPO, _cells_manifest, _mixed_batch, _model, _neu_det_tree


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
        TaskWeighting(["a"], "pcgrad")
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


# --------------------------------------------------------------------------- GradNorm


def _gradnorm_run(losses_at: callable, steps: int, alpha: float = 1.5) -> TaskWeighting:
    """Two tasks on one shared linear layer, one task per "batch" (as el_dual's batches are): task a's
    loss stays at its start, task b's halves; their unweighted gradient norms on the layer are equal."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 4)
    w = TaskWeighting(["a", "b"], "gradnorm", alpha=alpha, lr=0.05)
    w._shared = lambda: list(shared.parameters())
    x = torch.randn(8, 4)
    for step in range(steps):
        task = "ab"[step % 2]
        scale = losses_at(task, step)
        y = shared(x).pow(2).mean()
        loss = y * (scale / float(y.detach()))  # value `scale`, gradient ∝ scale
        w({task: loss}, {task})
    return w


def test_gradnorm_weights_sum_to_the_task_count_and_move_toward_the_slower_task() -> None:
    # b trains faster (loss → half); a is the slow task and must gain weight
    # (a's target alone: w_a = 0.77 (w_a + w_b / 2) with w_a + w_b = 2, i.e. w_a = 1.25)
    w = _gradnorm_run(lambda t, s: 1.0 if t == "a" else (1.0 if s < 2 else 0.5), steps=40)
    weights = w.weights()
    assert float(weights["a"] + weights["b"]) == pytest.approx(2.0, abs=1e-5)
    assert 1.3 > float(weights["a"]) > 1.1 and float(weights["b"]) < 0.9
    assert float(w.gn_ratio[0]) == pytest.approx(1.0) and float(w.gn_ratio[1]) == pytest.approx(0.5)
    # alpha 0: equal weighted gradient norms; b's gradient is half of a's, so b's weight goes up instead
    w0 = _gradnorm_run(lambda t, s: 1.0 if t == "a" else (1.0 if s < 2 else 0.5), steps=60, alpha=0.0)
    assert float(w0.weights()["b"]) > 1.15 and float(w0.weights()["a"]) < 0.85  # fixed point: w_b = 2 w_a


def test_gradnorm_waits_for_every_task_and_only_updates_in_training() -> None:
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 3)
    w = TaskWeighting(["a", "b"], "gradnorm")
    w._shared = lambda: list(shared.parameters())
    loss = shared(torch.randn(2, 3)).pow(2).sum()
    w({"a": loss}, {"a"})
    assert float(w.gn_steps) == 0 and torch.isnan(w.gn_norm[1])  # b unseen: no update yet
    w.eval()
    w({"b": shared(torch.randn(2, 3)).sum()}, {"b"})
    assert torch.isnan(w.gn_norm[1])  # eval: the weighted sum only
    w.train()
    total = w({"b": shared(torch.randn(2, 3)).pow(2).sum()}, {"b"})
    assert torch.isfinite(total) and float(w.gn_steps) == 1


def test_gradnorm_in_the_module_weighs_a_mixed_batch_and_records_both_tasks() -> None:
    module = InspectionModule(_model().train(), task_weighting="gradnorm", task_weighting_options={"alpha": 0.5})
    with torch.no_grad():
        module.task_weighting.gn_weights.copy_(torch.tensor([1.5, 0.5]))
    losses, parts = _parts(module, _mixed_batch())
    torch.testing.assert_close(losses["loss"], 1.5 * parts["grading"] + 0.5 * parts["localization"])
    tw = module.task_weighting
    assert bool(torch.isfinite(tw.gn_norm).all()) and float(tw.gn_weights.sum()) == pytest.approx(2.0, abs=1e-5)
    assert any(k.startswith("task_weighting.gn_weights") for k in module.state_dict())
    with pytest.raises(ValueError, match="not a submodule"):
        InspectionModule(_model(), task_weighting="gradnorm", task_weighting_options={"shared_layer": "no.such"})


# --------------------------------------------------------------------------- UPGrad


def test_upgrad_known_answer_on_conflicting_gradients() -> None:
    """g1 = (1, 0), g2 = (-1, 1) conflict (g1·g2 < 0). UPGrad projects g1 onto {x: g2·x ≥ 0} → (.5, .5)
    and g2 onto {x: g1·x ≥ 0} → (0, 1), and averages: (.25, .75). The sum is (0, 1): it stalls task 1."""
    from lineside.fusion.task_weighting import upgrad_aggregate

    jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    update, _ = upgrad_aggregate(jac)
    torch.testing.assert_close(update, torch.tensor([0.25, 0.75]), atol=1e-3, rtol=0)
    assert not torch.allclose(update, jac.sum(0), atol=0.1)
    assert bool((jac @ update > 0).all())  # no task's loss goes up to first order
    agree = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # no conflict: the mean of the rows
    torch.testing.assert_close(upgrad_aggregate(agree)[0], agree.mean(0), atol=1e-3, rtol=0)


def test_active_set_projector_solves_the_dual_cone_qp() -> None:
    """Against a brute-force grid minimum of vᵀGv subject to v ≥ u."""
    from lineside.fusion.task_weighting import _dual_cone_weights

    g = torch.tensor([[2.0, -1.0], [-1.0, 1.5]], dtype=torch.float64)
    u = torch.tensor([0.5, 0.0], dtype=torch.float64)
    v = _dual_cone_weights(u, g)
    grid = torch.stack(torch.meshgrid(torch.linspace(0.5, 2, 301), torch.linspace(0, 2, 401), indexing="ij"), -1).reshape(-1, 2).double()
    best = grid[torch.einsum("ni,ij,nj->n", grid, g, grid).argmin()]
    torch.testing.assert_close(v, best, atol=0.01, rtol=0)
    assert bool((v >= u - 1e-9).all())


# --------------------------------------------------------------------------- every method through the CLI


@pytest.mark.parametrize("weighting", ["fixed", "gradnorm", "upgrad"])
def test_each_weighting_method_fits_the_tiny_multitask_config(tmp_path: Path, weighting: str) -> None:
    """(sum and uncertainty: tests/test_multitask_data.py.) A few steps, finite losses, the weights logged."""
    from lineside.fusion.training_cli import main

    cfg = yaml.safe_load((REPO / "configs" / "tiny_multitask.yaml").read_text())
    members = cfg["data"]["init_args"]["datasets"]
    members["cells"]["init_args"]["manifest"] = str(_cells_manifest(tmp_path / "cells"))
    members["boxes"]["init_args"]["root"] = str(_neu_det_tree(tmp_path / "neu"))
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    cfg["trainer"]["max_steps"] = 3
    cfg["model"]["task_weighting"] = weighting
    if weighting == "fixed":
        cfg["model"]["task_weights"] = {"grading": 0.4, "localization": 0.6}
    path = tmp_path / "tiny_multitask.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == cfg["trainer"]["max_steps"]  # upgrad: optimizer steps (≈ 2 batches each)
    metrics = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in metrics[1:]]
    totals = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert totals and all(np.isfinite(totals))
    weights = cli.model.task_weighting.weights()
    if weighting == "gradnorm":
        assert float(sum(weights.values())) == pytest.approx(2.0, abs=1e-4)
        assert all(abs(float(w) - 1.0) > 1e-4 for w in weights.values())  # both tasks seen: the weights moved
    if weighting == "upgrad":
        assert not cli.model.automatic_optimization
        logged = [float(r[f"train/weight_{t}"]) for r in rows for t in ("grading", "localization") if r.get(f"train/weight_{t}")]
        assert any(abs(w - 1.0) > 1e-3 for w in logged)  # steps aggregated both tasks' rows (UPGrad's row weights)
        assert len(totals) > cfg["trainer"]["max_steps"]  # more batches than optimizer steps
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
