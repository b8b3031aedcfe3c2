"""The task contract: the model, the LightningModule and the deployable module loop over the tasks
present; named repeated tasks train only on the samples that carry their labels; old state-dict
keys stay; evaluation runs the deployable module in fp32 whatever autocast is on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lineside.fusion import FusionTransformer, GradingHead, InspectionModel
from lineside.fusion.deployable import DeployableModel
from lineside.fusion.grade_metrics import GradeMetrics
from lineside.fusion.lightning_module import InspectionModule
from lineside.fusion.localization_head import LocalizationHead
from lineside.fusion.tasks import TASK_TYPES, CenterNetLocalizationTask, GradingTask, TaskSettings, task_for
from lineside.vision import ImageEncoder

D = 32


def _model(localization: bool = True, xray: bool = False, seed: int = 0) -> InspectionModel:
    torch.manual_seed(seed)
    encoder = ImageEncoder(backbone="test_efficientnet", embed_dim=D, in_chans=1, feature_levels=[-2, -1], pretrained=False)
    return InspectionModel(
        encoder, FusionTransformer(D, depth=1, num_heads=2, dropout=0.0), GradingHead(D, 4),
        localization_head=LocalizationHead(D, num_classes=3, level_index=0, num_convs=1) if localization else None,
        heads={"grading/xray": GradingHead(D, 2)} if xray else None,
    ).eval()


def _batch(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randint(0, 256, (n, 1, 64, 64), dtype=torch.uint8, generator=g), "grade": torch.tensor([0, 3, -1][:n])}


def test_every_head_has_a_task_and_the_model_loops_over_them() -> None:
    model = _model()
    tasks = model.tasks
    assert [type(t) for t in tasks] == [GradingTask, CenterNetLocalizationTask]
    assert model.task_names == ["grading", "localization"]
    assert {c.kind for c in TASK_TYPES} == {"grading", "localization", "grasp", "segmentation"}
    out = model(_batch()["image"])
    assert [t.raw(out) is getattr(out, f) for t, f in zip(tasks, ("grade_logits", "localization"))] == [True, True]
    assert out.grasp is None and out.extra is None
    with pytest.raises(ValueError, match="is a grading head"):
        task_for(model, "localization", GradingHead(D, 4))
    with pytest.raises(ValueError, match="needs an image encoder"):
        from lineside.pointcloud.point_encoder import PointEncoder

        InspectionModel(point_encoder=PointEncoder(D, (16, 4), (8, 4), ((16, 32), (32, 32)), (0.1, 0.3)),
                        fusion=FusionTransformer(D, depth=1, num_heads=2, modalities={"points": 3}),
                        localization_head=LocalizationHead(D, 3))


def test_state_dict_keys_of_the_built_in_slots_are_unchanged() -> None:
    keys = list(_model().state_dict())
    assert any(k.startswith("grading_head.fc.") for k in keys) and any(k.startswith("localization_head.heatmap.") for k in keys)
    assert not any(k.startswith("heads.") for k in keys)  # no named task: nothing new in checkpoints
    named = list(_model(xray=True).state_dict())
    assert "heads.grading/xray.fc.weight" in named


def test_deployable_outputs_are_the_tasks_decoder_rows_in_task_order() -> None:
    model = _model(xray=True)
    d = DeployableModel(model, (64, 64), class_names=["ok", "mild", "moderate", "severe"], top_k=10)
    settings = TaskSettings(top_k=10).at((64, 64))
    want = [s.name for t in model.tasks for s in t.decoder(settings).outputs()]
    assert d.output_names == want == ["grade_probs", "grade", "grade_heatmap", "boxes", "box_scores", "box_labels",
                                      "defect_heatmap", "grade_probs_xray", "grade_xray"]
    out = d.run(_batch()["image"])
    assert out["grade_probs_xray"].shape == (3, 2) and torch.allclose(out["grade_probs_xray"].sum(-1), torch.ones(3))
    assert out["boxes"].shape == (3, 10, 4) and d.box_decoder.top_k == 10 and d.grade_decoder.num_grades == 4


def test_a_sample_trains_only_the_tasks_it_has_labels_for() -> None:
    module = InspectionModule(_model(xray=True))
    assert set(module.criteria) == {"grading", "localization", "grading/xray"}
    batch = _batch()
    out = module.model(batch["image"])
    losses = module._losses(out, batch)  # grades only: no box labels, no x-ray grades
    assert set(losses) == {"loss_grade", "loss_ordinal", "loss_grading", "loss"}
    batch["grade/xray"] = torch.tensor([1, -1, 0])
    losses = module._losses(module.model(batch["image"]), batch)
    assert {"grading/xray/loss_grade", "loss_grading/xray"} <= set(losses)
    assert torch.isclose(losses["loss"], losses["loss_grading"] + losses["loss_grading/xray"])
    # the x-ray head learns from its own labels only: its gradient vanishes without them
    module.model.zero_grad()
    module._losses(module.model(batch["image"]), {"image": batch["image"], "grade": batch["grade"]})["loss"].backward()
    assert all(p.grad is None or not p.grad.any() for p in module.model.heads["grading/xray"].parameters())
    with pytest.raises(ValueError, match="supervises none"):
        module._losses(out, {"image": batch["image"]})


def test_metrics_are_registered_torchmetrics_per_task_and_stage() -> None:
    module = InspectionModule(_model())
    for stage in ("val", "test"):
        assert isinstance(module.metrics[stage]["grading"], GradeMetrics)
        assert module.metrics[stage]["localization"] in list(module.modules())
    assert not any(k.startswith("metrics.") for k in module.state_dict())  # checkpoints keep only the model


def test_evaluation_runs_the_deployable_module_in_fp32_under_autocast() -> None:
    """Validation / test decode with autocast off: under a bf16 autocast the module's outputs equal
    the fp32 deployable module's, while the model itself would change under it."""
    module = InspectionModule(_model(localization=False), tta_views=2)
    batch = _batch()
    ref = DeployableModel(module.model, (64, 64), tta_views=2, grade_heatmap=False).run(batch["image"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = module.decode(batch)
        mixed = module.model(batch["image"].float()).grade_logits
    assert got["grade_probs"].dtype == torch.float32
    torch.testing.assert_close(got["grade_probs"], ref["grade_probs"], rtol=0, atol=0)
    assert mixed.dtype == torch.bfloat16  # what evaluating inside the trainer's autocast used to compute
    metric = module.metrics["test"]["grading"]
    module._evaluate(batch, "test")
    r = metric.compute()
    assert int(r["n"]) == 2 and float(r["acc"]) == float((ref["grade"][:2] == batch["grade"][:2]).float().mean())


def test_module_predictions_come_from_each_task() -> None:
    module = InspectionModule(_model(), top_k=5)
    batch = _batch() | {"path": ["a", "b", "c"]}
    with torch.no_grad():
        out = module.predict_step(batch, 0)
    assert out["path"] == ["a", "b", "c"] and out["boxes"].shape == (3, 5, 4) and out["defect_heatmap"].shape[:2] == (3, 1)
    np.testing.assert_allclose(out["confidence"].numpy(), out["probs"].max(-1).values.numpy())
    assert torch.equal(out["grade"], out["grade_probs"].argmax(-1))


# --------------------------------------------------------------------------- a new task: its files + one registration


class DefectAreaHead(torch.nn.Module):
    """Share of the image that is defective, from the mean fused token (a regression task)."""

    def __init__(self, embed_dim: int = D) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(embed_dim, 1)

    def forward(self, fused):
        keep = (~fused.padding_mask).unsqueeze(-1).float()
        return self.fc((fused.tokens * keep).sum(1) / keep.sum(1)).squeeze(-1)


class DefectAreaCriterion(torch.nn.Module):
    weight_dict = {"loss_area": 1.0}

    def forward(self, logits, targets):
        area = targets["area"]
        keep = ~area.isnan()  # samples without an area label add nothing
        loss = torch.nn.functional.mse_loss(logits[keep].sigmoid(), area[keep]) if keep.any() else logits.sum() * 0.0
        return {"loss_area": loss, "loss": loss}


def test_a_new_task_plugs_in_with_its_own_files_and_one_registration(monkeypatch) -> None:
    from torchmetrics import MeanAbsoluteError

    import lineside.fusion.tasks as tasks
    from lineside.fusion.outputs import TensorSpec
    from lineside.fusion.tasks import Task, TaskDecoder

    class DefectAreaDecoder(TaskDecoder):
        def specs(self):
            return [TensorSpec("defect_area", "float32", ("N",), "float", "defective share of the image, 0..1")]

        def decode(self, raw, context):
            return (raw.float().sigmoid(),)

    class DefectAreaTask(Task):  # the docs/adding_a_task.md example
        kind, head_type, label_key, output_names = "defect_area", DefectAreaHead, "area", ("defect_area",)

        def criterion(self):
            return DefectAreaCriterion()

        def decoder(self, settings):
            return DefectAreaDecoder(self.source, self.suffix)

        def metrics(self, settings):
            return MeanAbsoluteError()

        def update(self, metric, decoded, batch):
            area = self.targets(batch)["area"]
            metric.update(decoded[self.output_name("defect_area")][~area.isnan()], area[~area.isnan()])

        def compute(self, metric, stage, names):
            return {"area_mae": metric.compute()} if metric.update_called else {}

    monkeypatch.setattr(tasks, "TASK_TYPES", (*tasks.TASK_TYPES, DefectAreaTask))  # the one registration
    model = _model(localization=False)
    model = InspectionModel(model.image_encoder, model.fusion, model.grading_head, heads={"defect_area": DefectAreaHead()})
    assert model.task_names == ["grading", "defect_area"]
    module = InspectionModule(model)
    batch = _batch() | {"area": torch.tensor([0.0, 0.4, float("nan")])}
    losses = module._losses(module.model(batch["image"]), batch)
    assert {"loss_area", "loss_defect_area", "loss_grading"} <= set(losses) and torch.isfinite(losses["loss"])
    d = DeployableModel(model.eval(), (64, 64), grade_heatmap=False)
    assert d.output_names == ["grade_probs", "grade", "defect_area"]
    with torch.no_grad():
        module._evaluate(batch, "val")
    mae = module.metrics["val"]["defect_area"].compute()
    area = d.run(batch["image"])["defect_area"]
    assert float(mae) == pytest.approx(float((area[:2] - batch["area"][:2]).abs().mean()), abs=1e-6)
