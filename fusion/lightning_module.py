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

from lineside.fusion.box_decoder import BoxDecoder
from lineside.fusion.criterion import GradingCriterion
from lineside.fusion.detection_metrics import BoxMeanAP, PixelAUROC
from lineside.fusion.ensemble import format_confusion
from lineside.fusion.grasp_criterion import GraspCriterion
from lineside.fusion.grasp_decoder import GraspDecoder
from lineside.fusion.localization_criterion import LocalizationCriterion
from lineside.fusion.model import InspectionModel
from lineside.fusion.postprocess import predict_grades

__all__ = ["InspectionModule"]

log = logging.getLogger(__name__)


class InspectionModule(L.LightningModule):
    """Trains an :class:`InspectionModel` on the tasks it has heads for: severity grades and/or
    defect localization (boxes + defect heatmap).

    The total loss is the sum of the present tasks' losses: grading on samples with a grade
    (``grade >= 0``; the grading criterion gives a zero for a batch without any), localization on
    batches that carry boxes (``boxes``, ``has_boxes``). Validation and test decode boxes with
    :class:`BoxDecoder` and report box mAP (``map_50``, ``map``, per class) and, where masks
    exist, pixel AUROC of the defect heatmap.

    Args:
        model: the pure model (injected from the config).
        criterion: grading losses; class weights are set from the training data at fit start.
            Unused (None) for a model without a grading head.
        localization_criterion: localization losses, for a model with a localization head
            (``LocalizationCriterion`` for the CenterNet head, ``QueryLocalizationCriterion`` for
            the query head); default ``head.criterion(<the head's feature stride>)``.
        optimizer: optimizer factory (``class_path`` in YAML).
        scheduler: LR scheduler factory, stepped per epoch; optional.
        backbone_lr_scale: learning rate of the pretrained backbone relative to the rest.
        tta_views: dihedral test-time views (1, 2, 4, 8) for val/test/predict.
        class_names: grade names. The data module owns them: the CLI links ``data.class_names`` here,
            and at each stage's start the data module's names (its given order) are taken.
        box_class_names: defect (box) class names; taken from a detection data module at each
            stage's start.
        top_k: boxes decoded per image in validation / test / predict.
        grasp_criterion: grasp losses, for a model with a grasp head; default ``GraspCriterion()``.
        grasp_top_k / grasp_nms_radius: grasps decoded per cloud (:class:`GraspDecoder`, radius in m).
        coverage_radius: radius (m) of the graspable-region coverage metric (see :meth:`grasp_metrics`).

    Grasps: a batch with ``points`` (``point_mask``, optional ``point_features``) feeds the point
    encoder, a batch with ``image`` the image encoder (both when both are present); the grasp loss
    applies to batches that carry ``grasps``. Validation / test decode the top ``grasp_top_k``
    grasps in sensor metres and check them analytically against each sample's mesh
    (``grasp_top1``, ``grasp_top5``, ``grasp_coverage``, :meth:`grasp_metrics`).
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
        localization_criterion: torch.nn.Module | None = None,
        box_class_names: list[str] | None = None,
        top_k: int = 100,
        grasp_criterion: GraspCriterion | None = None,
        grasp_top_k: int = 5,
        grasp_nms_radius: float = 0.01,
        coverage_radius: float = 0.02,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # from the CLI "model" is its class_path config; else drop the object
            self.save_hyperparameters()
        for key in ("model", "criterion", "localization_criterion", "grasp_criterion"):
            if isinstance(self.hparams.get(key), torch.nn.Module):
                del self.hparams[key]
        self.model = model
        self.criterion = (criterion or GradingCriterion()) if getattr(model, "grading_head", None) is not None else None
        head = getattr(model, "localization_head", None)
        if head is not None and localization_criterion is None:
            localization_criterion = head.criterion(self.head_stride) if hasattr(head, "criterion") \
                else LocalizationCriterion(head.num_classes, stride=self.head_stride)
        self.localization_criterion = localization_criterion if head is not None else None
        has_grasp = getattr(model, "grasp_head", None) is not None
        self.grasp_criterion = (grasp_criterion or GraspCriterion()) if has_grasp else None
        self.grasp_decoder = GraspDecoder(grasp_top_k, grasp_nms_radius) if has_grasp else None
        self.coverage_radius = float(coverage_radius)
        self._grasp_results: dict[str, list] = {"val": [], "test": []}
        self._gripper = None  # the data module's gripper and friction (setup); default ParallelJawGripper(), mu 0.5
        self._mu = 0.5
        self.top_k = top_k
        self.box_class_names = list(box_class_names) if box_class_names else (
            [str(i) for i in range(head.num_classes)] if head is not None else [])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backbone_lr_scale = backbone_lr_scale
        self.tta_views = tta_views
        self.class_names = list(class_names) if class_names else [str(i) for i in range(model.num_grades)]
        k = model.num_grades
        if k > 0:
            metrics = MetricCollection(
                {"acc": MulticlassAccuracy(k, average="micro"), "macro_f1": MulticlassF1Score(k, average="macro")}
            )
            self.val_metrics = metrics.clone(prefix="val/")
            self.test_metrics = metrics.clone(prefix="test/")
            self.test_recall = MulticlassRecall(k, average="none")
            self.test_confusion = MulticlassConfusionMatrix(k)
            self.test_auroc = BinaryAUROC()
        if head is not None:
            self.box_map = {"val": BoxMeanAP(self.box_class_names, max_detections=top_k),
                            "test": BoxMeanAP(self.box_class_names, max_detections=top_k)}
            self.pixel_auroc = {"val": PixelAUROC(), "test": PixelAUROC()}
            self._box_updates = {"val": 0, "test": 0}
            self._decoders: dict[tuple[int, int], BoxDecoder] = {}

    @property
    def tasks(self) -> list[str]:
        return [t for t in self.model.tasks if t in ("grading", "localization", "grasp")]

    @property
    def head_stride(self) -> float:
        """Model-input pixels per cell of the localization head's grid."""
        head = self.model.localization_head
        return float(self.model.image_encoder.strides[head.level_index])

    @property
    def has_grading(self) -> bool:
        return getattr(self.model, "grading_head", None) is not None

    @property
    def has_localization(self) -> bool:
        return getattr(self.model, "localization_head", None) is not None

    @property
    def has_grasp(self) -> bool:
        return getattr(self.model, "grasp_head", None) is not None

    # -- setup -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "task", None) == "grasp":
            if not self.has_grasp:
                raise ValueError(f"data {dm.source} carries grasp labels on point clouds but the model has no grasp head: set "
                                 "model.init_args.model.init_args.point_encoder and .grasp_head (configs/parts_grasp.yaml)")
            self._gripper = getattr(dm, "gripper", None)
            self._mu = float(getattr(dm, "point_config", {}).get("mu", 0.5))
            return
        if dm is None or not hasattr(dm, "num_classes"):
            return
        if getattr(dm, "task", "grading") == "localization":
            if not self.has_localization:
                raise ValueError(f"data {dm.source} carries defect boxes but the model has no localization head: "
                                 "set model.init_args.model.init_args.localization_head")
            if dm.num_classes != self.model.localization_head.num_classes:
                raise ValueError(
                    f"data {dm.source} has {dm.num_classes} defect classes {dm.class_names} but the localization head has "
                    f"{self.model.localization_head.num_classes}: set model.init_args.model.init_args.localization_head.init_args.num_classes"
                )
            self.box_class_names = list(dm.class_names)
            for m in self.box_map.values():
                m.class_names = self.box_class_names
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

    def _inputs(self, batch: dict) -> dict:
        """The model's keyword inputs from a batch: ``image`` and/or ``points`` (+ mask, features), ``text``."""
        kw: dict = {}
        if "image" in batch:
            kw["image"] = batch["image"]
        if "points" in batch:
            kw.update(points=batch["points"], point_mask=batch["point_mask"], point_features=batch.get("point_features"))
        text = self._text(batch)
        if text is not None:
            kw["text"] = text
        return kw

    @staticmethod
    def _batch_size(batch: dict) -> int:
        return len(batch["image"] if "image" in batch else batch["points"])

    def _losses(self, out, batch: dict) -> dict[str, torch.Tensor]:
        """Per-task losses and ``loss`` (their sum). A grading-only model logs exactly the grading
        criterion's terms; a multi-task one adds ``loss_grading`` / ``loss_localization`` subtotals."""
        losses: dict[str, torch.Tensor] = {}
        parts: dict[str, torch.Tensor] = {}
        if self.criterion is not None and out.grade_logits is not None and "grade" in batch:
            g = self.criterion(out, batch)
            parts["grading"] = g.pop("loss")
            losses.update(g)
        if self.localization_criterion is not None and out.localization is not None and "boxes" in batch:
            loc = self.localization_criterion(out, batch)
            parts["localization"] = loc.pop("loss")
            losses.update(loc)
        if self.grasp_criterion is not None and out.grasp is not None and "grasps" in batch:
            gr = self.grasp_criterion(out.grasp, batch)
            parts["grasp"] = gr.pop("loss")
            losses.update(gr)
        if not parts:
            raise ValueError(f"the batch supervises none of the model's tasks {self.tasks} (keys: {sorted(batch)})")
        if len(parts) > 1 or "grading" not in parts:
            losses.update({f"loss_{t}": v for t, v in parts.items()})
        losses["loss"] = sum(parts.values())
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self._losses(self.model(**self._inputs(batch)), batch)
        n = self._batch_size(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=False, batch_size=n)
        self.log("loss", losses["loss"], prog_bar=True, logger=False, batch_size=n)
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

    def _decoder(self, image: torch.Tensor) -> BoxDecoder:
        size = (int(image.shape[-2]), int(image.shape[-1]))
        if size not in self._decoders:
            s, head = self.head_stride, self.model.localization_head
            if hasattr(head, "decoder"):  # the head's own decoder (e.g. the query head's)
                self._decoders[size] = head.decoder(s, size, top_k=self.top_k)
            else:
                cells = head.num_classes * -(-size[0] // int(s)) * -(-size[1] // int(s))
                self._decoders[size] = BoxDecoder(s, size, top_k=min(self.top_k, cells))
        return self._decoders[size]

    def _localize(self, batch: dict, stage: str):
        """Decoded boxes of the batch (no test-time views), and for val/test: loss, mAP and pixel AUROC updates."""
        text = self._text(batch)
        out = self.model(batch["image"], **({"text": text} if text is not None else {}))
        boxes, scores, labels, heat = self._decoder(batch["image"])(out.localization)
        if stage in ("val", "test") and "boxes" in batch:
            n = len(batch["image"])
            loss = self.localization_criterion(out, batch)["loss"]
            self.log(f"{stage}/loss_localization", loss, batch_size=n)
            keep = batch.get("has_boxes")
            self.box_map[stage].update(boxes, scores, labels, batch["boxes"], batch["labels"], batch["box_mask"], keep)
            self._box_updates[stage] += n if keep is None else int(keep.sum())
            if "mask" in batch and "has_mask" in batch:
                self.pixel_auroc[stage].update(heat, batch["mask"], batch["has_mask"])
        return boxes, scores, labels, heat

    def _log_localization(self, stage: str) -> None:
        if self._box_updates[stage]:
            r = self.box_map[stage].compute()
            self.log_dict({f"{stage}/{k}": v for k, v in r.items() if k != "map_50"}, prog_bar=False)
            self.log(f"{stage}/map_50", r["map_50"], prog_bar=True)
            auroc = self.pixel_auroc[stage].compute()
            if auroc == auroc:  # not nan: masks with both classes were seen
                self.log(f"{stage}/pixel_auroc", auroc)
                self.log(f"{stage}/pro", self.pixel_auroc[stage].compute_pro())  # per-region overlap, FPR <= 0.3
        self.box_map[stage].reset()
        self.pixel_auroc[stage].reset()
        self._box_updates[stage] = 0

    def _grasp(self, batch: dict, stage: str):
        """Decoded grasps (sensor metres, best first) of a point batch; for val/test also the grasp loss and
        the batch's rows for :meth:`grasp_metrics` (checked at the epoch's end)."""
        out = self.model(**self._inputs(batch))
        if out.grasp is None:
            raise ValueError(f"the batch has no points for the grasp head (keys: {sorted(batch)})")
        pos, app, clo, width, score = self.grasp_decoder.decode(out.grasp, batch["center"], batch["scale"])
        if stage in ("val", "test") and "grasps" in batch:
            n = self._batch_size(batch)
            self.log(f"{stage}/loss_grasp", self.grasp_criterion(out.grasp, batch)["loss"], batch_size=n)
            gt = batch["grasps"][..., 0:3] * batch["scale"].view(-1, 1, 1) + batch["center"].unsqueeze(1)
            for i in range(n):
                self._grasp_results[stage].append((pos[i].detach().cpu().numpy(), app[i].detach().cpu().numpy(),
                                                   clo[i].detach().cpu().numpy(), score[i].detach().cpu().numpy(),
                                                   batch["mesh"][i], gt[i][batch["grasp_mask"][i]].cpu().numpy()))
        return pos, app, clo, width, score

    def grasp_metrics(self, rows: list) -> dict[str, float]:
        """Analytic grasp success and coverage of decoded grasps.

        ``rows``: per sample ``(position (K, 3), approach (K, 3), closing (K, 3), score (K,), mesh, gt (M, 3))``
        in sensor metres, ``mesh`` a :func:`~lineside.pointcloud.grasp_dataset.load_mesh` reference,
        ``gt`` the ground-truth grasp centres.

        * ``grasp_top1`` / ``grasp_top5``: fraction of samples whose best (any of the best five) decoded
          grasp passes :func:`~lineside.pointcloud.grasp_labels.evaluate_grasps` on the mesh (antipodal
          contacts, friction cone, no jaw/palm collision); grasps with score 0 (none left) fail.
        * ``grasp_coverage``: how much of the graspable surface the top K reaches. Per sample the
          ground-truth centres are clustered greedily (a centre more than ``coverage_radius`` from every
          earlier cluster seed starts a new cluster); a cluster is covered when a *successful* decoded
          grasp lies within ``coverage_radius`` of its seed. Coverage = covered / clusters, averaged over
          samples with ground truth. It is bounded by K / clusters: it rewards spread-out correct grasps.
        """
        import numpy as np

        from lineside.pointcloud.grasp_dataset import grasp_success

        if not rows:
            return {}
        kw = {"mu": self._mu} if self._gripper is None else {"gripper": self._gripper, "mu": self._mu}
        ok = grasp_success(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows]),
                           [r[4] for r in rows], np.stack([r[3] for r in rows]), **kw)
        out = {"grasp_top1": float(ok[:, :1].any(1).mean()), "grasp_top5": float(ok[:, :5].any(1).mean())}
        cov = []
        r = self.coverage_radius
        for (pos, *_, gt), good in zip(rows, ok):
            if len(gt) == 0:
                continue
            seeds: list = []
            for c in gt:
                if all(np.linalg.norm(c - s) > r for s in seeds):
                    seeds.append(c)
            hits = pos[good]
            cov.append(np.mean([bool(len(hits)) and float(np.linalg.norm(hits - s, axis=1).min()) <= r for s in seeds]))
        out["grasp_coverage"] = float(np.mean(cov)) if cov else 0.0
        return out

    def _log_grasp(self, stage: str) -> None:
        rows, self._grasp_results[stage] = self._grasp_results[stage], []
        m = self.grasp_metrics(rows)
        if m:
            self.log(f"{stage}/grasp_top1", m.pop("grasp_top1"), prog_bar=True)
            self.log_dict({f"{stage}/{k}": v for k, v in m.items()})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.has_grasp and "points" in batch:
            self._grasp(batch, "val")
        if self.has_grading and "image" in batch:
            self._eval_step(batch, self.val_metrics, "val")
        if self.has_localization:
            self._localize(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.has_grasp:
            self._log_grasp("val")
        if self.has_grading:
            self.log_dict(self.val_metrics.compute(), prog_bar=True)
            self.val_metrics.reset()
        if self.has_localization:
            self._log_localization("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if self.has_grasp and "points" in batch:
            self._grasp(batch, "test")
        if "image" not in batch:
            return
        if self.has_localization:
            self._localize(batch, "test")
        if not self.has_grading:
            return
        pred, grade, valid = self._eval_step(batch, self.test_metrics, "test")
        if valid.any():
            self.test_recall.update(pred.probs[valid], grade[valid])
            self.test_confusion.update(pred.probs[valid], grade[valid])
            self.test_auroc.update(1.0 - pred.probs[valid, 0], (grade[valid] > 0).long())

    def on_test_epoch_end(self) -> None:
        if self.has_grasp:
            self._log_grasp("test")
        if self.has_localization:
            self._log_localization("test")
        if not self.has_grading:
            return
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
        result = {"path": batch["path"] if "path" in batch else batch.get("mesh")}
        if self.has_grasp and "points" in batch:
            pos, app, clo, width, score = self._grasp(batch, "predict")
            result.update({"grasp_position": pos, "grasp_approach": app, "grasp_closing": clo, "grasp_width": width, "grasp_score": score})
        if "image" not in batch:
            return result
        if self.has_grading:
            pred = predict_grades(self.model, batch["image"], self.tta_views, self._text(batch))
            result.update({"grade": pred.grade, "confidence": pred.confidence, "probs": pred.probs})
        if self.has_localization:
            boxes, scores, labels, heat = self._localize(batch, "predict")
            result.update({"boxes": boxes, "box_scores": scores, "box_labels": labels, "defect_heatmap": heat})
        return result

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
            "box_class_names": self.box_class_names,
            "tasks": self.tasks,
            "model_config": self.hparams.get("model") if isinstance(self.hparams.get("model"), dict) else None,
        }
        if self.has_grasp:
            checkpoint["lineside"]["points"] = getattr(dm, "point_config", None)
            checkpoint["lineside"]["grasp_top_k"] = self.grasp_decoder.top_k
            checkpoint["lineside"]["grasp_nms_radius"] = self.grasp_decoder.nms_radius
