"""InspectionModule: the thin LightningModule (batch → model → criterion → log)."""

from __future__ import annotations

import csv
import logging
import os
import warnings

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
)

from lineside.fusion.criterion import GradingCriterion
from lineside.fusion.ensemble import format_confusion
from lineside.fusion.model import InspectionModel
from lineside.fusion.postprocess import predict_grades

__all__ = ["InspectionModule"]

log = logging.getLogger(__name__)


class InspectionModule(L.LightningModule):
    """Trains an :class:`InspectionModel` on severity grades.

    Args:
        model: the pure model (injected from the config).
        criterion: losses; class weights are set from the training data at fit start.
        optimizer: optimizer factory (``class_path`` in YAML).
        scheduler: LR scheduler factory, stepped per epoch; optional.
        backbone_lr_scale: learning rate of the pretrained backbone relative to the rest.
        tta_views: dihedral test-time views (1, 2, 4, 8) for val/test/predict.
        class_names: grade names. The data module owns them: the CLI links ``data.class_names`` here,
            and at each stage's start the data module's names (its given order) are taken.
    """

    def __init__(
        self,
        model: InspectionModel,
        criterion: GradingCriterion | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        backbone_lr_scale: float = 1.0,
        tta_views: int = 1,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # from the CLI "model" is its class_path config; else drop the object
            self.save_hyperparameters()
        for key in ("model", "criterion"):
            if isinstance(self.hparams.get(key), torch.nn.Module):
                del self.hparams[key]
        self.model = model
        self.criterion = criterion or GradingCriterion()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backbone_lr_scale = backbone_lr_scale
        self.tta_views = tta_views
        self.class_names = list(class_names) if class_names else [str(i) for i in range(model.num_grades)]
        k = model.num_grades
        metrics = MetricCollection(
            {"acc": MulticlassAccuracy(k, average="micro"), "macro_f1": MulticlassF1Score(k, average="macro")}
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.test_recall = MulticlassRecall(k, average="none")
        self.test_confusion = MulticlassConfusionMatrix(k)
        self.test_auroc = BinaryAUROC()

    # -- setup -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "num_classes"):
            return
        if dm.num_classes != self.model.num_grades:
            raise ValueError(
                f"data {dm.source} has {dm.num_classes} classes {dm.class_names} but the grading head has "
                f"{self.model.num_grades} outputs: set model.init_args.model.init_args.grading_head.init_args.num_grades"
            )
        self.class_names = list(dm.class_names)
        if stage == "fit":
            self.criterion.set_class_counts(dm.class_counts)
            log.info("class counts %s → weights %s", dm.class_counts, [round(w, 3) for w in self.criterion.class_weights.tolist()])

    # -- steps -----------------------------------------------------------------------------
    def forward(self, image: torch.Tensor, text=None):
        return predict_grades(self.model, image, self.tta_views, text)

    def _text(self, batch: dict):
        """Per-sample texts for a model with a text encoder (None otherwise)."""
        return batch.get("text") if getattr(self.model, "text_encoder", None) is not None else None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        text = self._text(batch)
        losses = self.criterion(self.model(batch["image"], **({"text": text} if text is not None else {})), batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=False, batch_size=len(batch["grade"]))
        self.log("loss", losses["loss"], prog_bar=True, logger=False, batch_size=len(batch["grade"]))
        return losses["loss"]

    def _eval_step(self, batch: dict, metrics: MetricCollection, prefix: str):
        pred = predict_grades(self.model, batch["image"], self.tta_views, self._text(batch))
        grade = batch["grade"]
        valid = grade >= 0
        if valid.any():
            metrics.update(pred.probs[valid], grade[valid])
            nll = torch.nn.functional.nll_loss(pred.probs[valid].clamp_min(1e-8).log(), grade[valid])
            self.log(f"{prefix}/nll", nll, batch_size=int(valid.sum()))
        return pred, grade, valid

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        pred, grade, valid = self._eval_step(batch, self.test_metrics, "test")
        if valid.any():
            self.test_recall.update(pred.probs[valid], grade[valid])
            self.test_confusion.update(pred.probs[valid], grade[valid])
            self.test_auroc.update(1.0 - pred.probs[valid, 0], (grade[valid] > 0).long())

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        for name, r in zip(self.class_names, self.test_recall.compute()):
            self.log(f"test/recall_{name}", r)
        self.log("test/auroc_defective", self.test_auroc.compute())
        cm = self.test_confusion.compute().cpu().tolist()
        self._report_confusion(cm)
        for m in (self.test_metrics, self.test_recall, self.test_confusion, self.test_auroc):
            m.reset()

    def _report_confusion(self, cm: list[list[int]]) -> None:
        if self.trainer.is_global_zero:
            print(format_confusion(self.class_names, cm))
            log_dir = self.trainer.log_dir
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                with open(os.path.join(log_dir, "test_confusion_matrix.csv"), "w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(["true\\pred", *self.class_names])
                    w.writerows([[n, *row] for n, row in zip(self.class_names, cm)])

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        pred = predict_grades(self.model, batch["image"], self.tta_views, self._text(batch))
        return {"path": batch["path"], "grade": pred.grade, "confidence": pred.confidence, "probs": pred.probs}

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        encoder = getattr(self.model, "image_encoder", None)
        backbone = [p for p in encoder.backbone.parameters() if p.requires_grad] if encoder is not None else []
        ids = {id(p) for p in backbone}
        rest = [p for p in self.model.parameters() if id(p) not in ids and p.requires_grad]
        optimizer = self.optimizer_factory(
            [{"params": rest, "name": "head"}, {"params": backbone, "name": "backbone", "lr_scale": self.backbone_lr_scale}]
        )
        for g in optimizer.param_groups:  # schedulers take these as their initial LRs
            g["lr"] = g["lr"] * g.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # class weights are recomputed from the data at each fit start; older checkpoints stored them
        checkpoint["state_dict"].pop("criterion.class_weights", None)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint["lineside"] = {
            "class_names": self.class_names,
            "image_size": getattr(dm, "image_size", None),
            "channels": self.model.in_chans,
            "tta_views": self.tta_views,
            "model_config": self.hparams.get("model") if isinstance(self.hparams.get("model"), dict) else None,
        }
