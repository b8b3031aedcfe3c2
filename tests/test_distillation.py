"""Distillation: the soft-target loss at temperature T, a frozen teacher, gradients into the student only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lineside.fusion import FusionTransformer, GradingHead, InspectionModel
from lineside.fusion.distillation import Distillation, DistillationCriterion, load_teacher
from lineside.fusion.lightning_module import InspectionModule
from lineside.vision import ImageEncoder

D = 16
_CONFIG = {
    "class_path": "lineside.fusion.InspectionModel",
    "init_args": {
        "image_encoder": {"class_path": "lineside.vision.ImageEncoder",
                          "init_args": {"backbone": "test_efficientnet", "embed_dim": D, "in_chans": 1, "feature_levels": [-1], "pretrained": True}},
        "fusion": {"class_path": "lineside.fusion.FusionTransformer", "init_args": {"embed_dim": D, "depth": 1, "num_heads": 2, "dropout": 0.0}},
        "grading_head": {"class_path": "lineside.fusion.GradingHead", "init_args": {"embed_dim": D, "num_grades": 4, "dropout": 0.0}},
    },
}


def _model(seed: int) -> InspectionModel:
    torch.manual_seed(seed)
    enc = ImageEncoder(backbone="test_efficientnet", embed_dim=D, in_chans=1, feature_levels=[-1], pretrained=False)
    return InspectionModel(image_encoder=enc, fusion=FusionTransformer(embed_dim=D, depth=1, num_heads=2, dropout=0.0),
                           grading_head=GradingHead(D, 4, dropout=0.0))


@pytest.fixture
def teacher_ckpt(tmp_path):
    teacher = _model(seed=1)
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in teacher.state_dict().items()},
                "lineside": {"model_config": _CONFIG, "image_size": 96, "class_names": ["a", "b", "c", "d"]}}, path)
    return path, teacher


def test_soft_loss_is_t2_kl_and_zero_for_equal_logits():
    torch.manual_seed(0)
    crit = DistillationCriterion(temperature=4.0)
    teacher = torch.randn(8, 4) * 3
    assert float(crit(teacher.clone(), teacher)) == pytest.approx(0.0, abs=1e-6)
    assert float(crit(teacher + 5.0, teacher)) == pytest.approx(0.0, abs=1e-5)  # softmax ignores a per-row shift
    student = torch.randn(8, 4)
    loss = crit(student, teacher)
    expected = F.kl_div(F.log_softmax(student / 4, -1), F.log_softmax(teacher / 4, -1), reduction="batchmean", log_target=True) * 16
    assert float(loss) > 0 and float(loss) == pytest.approx(float(expected), rel=1e-5)
    # a higher temperature softens both distributions: the unscaled KL shrinks
    assert float(DistillationCriterion(8.0)(student, teacher)) / 64 < float(loss) / 16
    w = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0.0])
    assert float(crit(student, teacher, w)) == pytest.approx(float(crit(student[:2], teacher[:2])), rel=1e-5)
    with pytest.raises(ValueError):
        DistillationCriterion(0.0)


def test_soft_loss_gradient_reaches_the_student_only():
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    DistillationCriterion(2.0)(student, teacher).backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    assert teacher.grad is None


def test_load_teacher_is_frozen_and_matches(teacher_ckpt):
    path, reference = teacher_ckpt
    teacher, size = load_teacher(path)
    assert size == 96 and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randint(0, 256, (2, 1, 96, 96), dtype=torch.uint8)
    assert torch.allclose(teacher(image=x).grade_logits, reference.eval()(image=x).grade_logits, atol=1e-6)
    with pytest.raises(FileNotFoundError):
        load_teacher(path.parent / "missing.ckpt")


def test_distillation_hook_mixes_losses_and_resizes_for_teacher(teacher_ckpt):
    path, _ = teacher_ckpt
    hook = Distillation(str(path), temperature=2.0, alpha=0.7)
    seen = []
    teacher = hook.teacher
    teacher.register_forward_pre_hook(lambda m, args, kwargs: seen.append(tuple(kwargs["image"].shape)), with_kwargs=True)
    student = _model(seed=0).train()
    batch = {"image": torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8), "grade": torch.tensor([0, 1, 3])}
    out = student(image=batch["image"])
    hard = F.cross_entropy(out.grade_logits, batch["grade"])
    losses = hook({"loss": hard}, out, batch)
    assert seen == [(3, 1, 96, 96)]  # the teacher sees the frames at its own training size
    soft = losses["loss_distill"]
    assert float(losses["loss"]) == pytest.approx(0.3 * float(hard) + 0.7 * float(soft), rel=1e-6)
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.parameters())


def test_student_module_trains_with_frozen_teacher(teacher_ckpt, tmp_path):
    import lightning as L

    path, _ = teacher_ckpt
    module = InspectionModule(_model(seed=0), distill={"teacher": str(path), "temperature": 4.0, "alpha": 0.7})
    teacher = module.loss_hooks[0].teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    images = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader([0], collate_fn=lambda _: {"image": images, "grade": torch.tensor([0, 1, 2, 3])})
    seen = {}

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Spy()], log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader)
    assert {"train/loss_distill", "train/loss_hard", "train/teacher_agreement"} <= set(seen)
    assert seen["train/loss"] == pytest.approx(0.3 * seen["train/loss_hard"] + 0.7 * seen["train/loss_distill"], rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher never moves
    assert any(not torch.equal(student_before[k], v) for k, v in module.model.state_dict().items())
    assert all(not k.startswith(("teacher", "loss_hooks")) and "teacher" not in k for k in module.state_dict())
    assert module.hparams["distill"]["teacher"] == str(path)
