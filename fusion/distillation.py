"""Knowledge distillation of a grading model into a smaller student (Hinton et al. 2015).

The student (any :class:`~lineside.fusion.model.InspectionModel`, typically a smaller backbone at a
lower resolution) trains on

``loss = (1 − α) · hard + α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``

where ``hard`` is the student's own task loss on the labels and ``z_t`` the logits of a frozen teacher
(a ``lineside fit`` checkpoint or a ``lineside crossval`` ``ensemble.ckpt``). The ``T²`` keeps the
soft term's gradients on the scale of the hard term's as ``T`` changes. Optionally a feature term
matches the student's pooled fused tokens to the teacher's through a learnt linear map (``beta``).

The teacher sees the same frames as the student. The data pipeline gives one image size, the
student's; the teacher's copy is resized in the training step to the teacher's own training size
with :func:`lineside.vision.preprocess.resize_uint8`, the resize of every lineside path.

Use: ``model.distill: {teacher: runs/quickstart/checkpoints/best.ckpt, temperature: 4, alpha: 0.7}``
(see ``configs/elpv_student.yaml``). The teacher is loaded at the first training step, kept out of
the student's ``state_dict`` and checkpoints, and never receives gradients.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lineside.fusion.checkpoint_file import read_checkpoint
from lineside.vision.preprocess import resize_uint8

__all__ = ["Distillation", "DistillationCriterion", "load_teacher"]

log = logging.getLogger(__name__)


class DistillationCriterion(nn.Module):
    """Soft-target loss of logits: ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, batch mean.

    Zero when the student's logits equal the teacher's (or differ by a per-row constant); the
    teacher's logits are detached, so gradients reach the student only.

    Args:
        temperature: T > 0; higher spreads the teacher's probabilities over the wrong grades.

    Shapes:
        forward: student (B, K), teacher (B, K) logits, optional ``weight`` (B,) 0/1 row mask → scalar.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ in shape")
        t = self.temperature
        log_p_s = F.log_softmax(student.float() / t, dim=-1)
        log_p_t = F.log_softmax(teacher.detach().float() / t, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B,)
        if weight is not None:
            w = weight.float()
            return (kl * w).sum() / w.sum().clamp_min(1.0) * t * t
        return kl.mean() * t * t


def _instantiate(config: Any) -> Any:
    """``{"class_path", "init_args"}`` dicts → objects, recursively, with pretrained weights off
    (the checkpoint's own weights replace them; nothing is downloaded)."""
    if isinstance(config, dict) and "class_path" in config:
        args = {k: _instantiate(v) for k, v in (config.get("init_args") or {}).items()}
        if "pretrained" in args:
            args["pretrained"] = False
        args.pop("weights_path", None)
        path = config["class_path"]
        if path.split(".", 1)[0] in ("vision", "fusion", "pointcloud"):
            path = "lineside." + path
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)(**args)
    if isinstance(config, dict):
        return {k: _instantiate(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_instantiate(v) for v in config]
    return config


def load_teacher(path: str | os.PathLike, trust_checkpoint: bool = False) -> tuple[nn.Module, int]:
    """A frozen teacher (eval mode, no gradients) and its training image size from a checkpoint.

    ``path`` is a ``lineside fit`` checkpoint or a ``lineside crossval`` ``ensemble.ckpt``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"distillation teacher {path} not found (model.distill.teacher)")
    ckpt = read_checkpoint(path, "cpu", trust_checkpoint)
    meta = ckpt.get("lineside") if isinstance(ckpt, dict) else None
    if not meta or not meta.get("model_config"):
        raise ValueError(f"{path}: no lineside model config inside; a teacher is a checkpoint of `lineside fit` or `lineside crossval`")
    ensemble = meta.get("ensemble")
    if ensemble:
        from lineside.fusion.ensemble import InspectionEnsemble

        configs = ensemble.get("member_configs") or [meta["model_config"]] * int(ensemble["members"])
        teacher: nn.Module = InspectionEnsemble([_instantiate(c) for c in configs], ensemble.get("grade_bias"))
    else:
        teacher = _instantiate(meta["model_config"])
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = teacher.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit its configured model (missing {missing[:4]}, unexpected {unexpected[:4]})")
    teacher.eval().requires_grad_(False)
    return teacher, int(meta.get("image_size") or 224)


class Distillation:
    """The distillation loss hook of :class:`~lineside.fusion.lightning_module.InspectionModule`
    (``model.distill``): replaces ``loss`` by ``(1 − α) · loss + α · loss_distill``.

    Args:
        teacher: checkpoint of the teacher (``lineside fit`` or ``ensemble.ckpt``).
        temperature: softmax temperature T of the soft targets.
        alpha: weight of the soft term (1 − α on the labels' loss).
        teacher_size: side the teacher sees; default its training size from the checkpoint.
        trust_checkpoint: load a teacher pickle that holds more than weights.

    Logged: ``train/loss_distill`` (the T²-scaled KL), ``train/loss_hard`` (the task loss) and
    ``train/teacher_agreement`` (share of rows whose arg-max grade the student shares with the teacher).
    The teacher is kept outside the module tree (not in ``state_dict``), moved to the batch's device.
    """

    def __init__(self, teacher: str, temperature: float = 4.0, alpha: float = 0.7, teacher_size: int | None = None,
                 trust_checkpoint: bool = False) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {alpha}")
        self.teacher_path, self.alpha, self.teacher_size = teacher, float(alpha), teacher_size
        self.trust_checkpoint = trust_checkpoint
        self.criterion = DistillationCriterion(temperature)
        self._teacher: nn.Module | None = None

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher, loaded on first use."""
        if self._teacher is None:
            self._teacher, size = load_teacher(self.teacher_path, self.trust_checkpoint)
            self.teacher_size = self.teacher_size or size
            log.info("distillation teacher %s at %d px, T=%g, alpha=%g", self.teacher_path, self.teacher_size,
                     self.criterion.temperature, self.alpha)
        return self._teacher

    def set_teacher(self, teacher: nn.Module, size: int) -> None:
        """Use an in-memory teacher (frozen here) instead of loading ``teacher``."""
        self._teacher = teacher.eval().requires_grad_(False)
        self.teacher_size = size

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> Tensor:
        """(B, K) teacher grade logits on the batch's frames, resized to the teacher's size."""
        teacher = self.teacher
        image = batch["image"]
        device = image.device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        frames = image if image.dtype == torch.uint8 else image.round().clamp(0, 255).to(torch.uint8)
        frames = resize_uint8(frames, self.teacher_size)
        teacher.eval()
        with torch.autocast(device.type, enabled=False):
            return teacher(image=frames).grade_logits.float()

    def __call__(self, losses: dict[str, Tensor], out, batch: dict) -> dict[str, Tensor]:
        student = out.grade_logits
        if student is None:
            raise ValueError("model.distill needs a grading head on the student (grade_logits)")
        teacher = self.teacher_logits(batch)
        soft = self.criterion(student, teacher)
        hard = losses["loss"]
        losses["loss_hard"] = hard.detach()
        losses["loss_distill"] = soft
        losses["teacher_agreement"] = (student.detach().argmax(-1) == teacher.argmax(-1)).float().mean()
        losses["loss"] = (1.0 - self.alpha) * hard + self.alpha * soft
        return losses
