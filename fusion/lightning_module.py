"""InspectionModule: the thin LightningModule (batch → model → criterion → log; metrics via the tasks)."""

from __future__ import annotations

import os
import warnings
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lineside.fusion.criterion import GradingCriterion
from lineside.fusion.deployable import DeployableModel, batch_inputs
from lineside.fusion.grasp_criterion import GraspCriterion
from lineside.fusion.model import InspectionModel
from lineside.fusion.task_weighting import TaskWeighting
from lineside.fusion.tasks import TaskSettings, task_type

__all__ = ["InspectionModule"]

EVAL_PRECISION = "fp32, autocast off"  # how validation / test run the deployable module, whatever trainer.precision says


class InspectionModule(L.LightningModule):
    """Trains an :class:`InspectionModel` on the tasks it has heads for (:mod:`lineside.fusion.tasks`).

    Training: the loss sums each task's criterion over the batches that carry its labels (others add
    nothing), logged per term and as ``loss_<task>``. Validation and test run the model's deployable
    module (:class:`~lineside.fusion.deployable.DeployableModel`, as ``lineside score`` and every
    artefact run it) on the batch's uint8 frames in fp32 with autocast off, whatever
    ``trainer.precision`` trains in; each task's torchmetrics metrics read the *decoded* outputs, so
    ``lineside test`` and ``lineside score`` report the same figures on the same checkpoint and images.

    Args:
        model: the pure model (injected from the config).
        criterion: grading losses (default ``GradingCriterion()``); class weights are set from the
            training data at fit start.
        optimizer: optimizer factory (``class_path`` in YAML).
        scheduler: LR scheduler factory, stepped per epoch; optional.
        backbone_lr_scale: learning rate of the pretrained backbone relative to the rest.
        tta_views: dihedral test-time views (1, 2, 4, 8) for val/test/predict.
        class_names: grade names. The data module owns them: the CLI links ``data.class_names`` here,
            and at each stage's start the data module's names (its given order) are taken.
        localization_criterion: localization losses (default: the head's task's, e.g.
            ``LocalizationCriterion`` or ``QueryLocalizationCriterion``).
        box_class_names: defect (box) class names; taken from a detection data module at each stage's start.
        top_k: boxes decoded per image in validation / test / predict.
        grasp_criterion: grasp losses (default ``GraspCriterion()``).
        grasp_top_k / grasp_nms_radius: grasps decoded per cloud (radius in m).
        coverage_radius: radius (m) of the graspable-region coverage metric (:mod:`fusion.grasp_metrics`).
        criteria: criteria of further (named) tasks by task name.
        task_weighting: how the tasks' losses of a batch are summed (:mod:`lineside.fusion.task_weighting`):
            ``sum``, ``fixed`` (``task_weights``), ``uncertainty`` (learnt log-variances, Kendall et al. 2018),
            ``gradnorm`` (Chen et al. 2018) or ``upgrad`` (torchjd Jacobian descent; manual optimisation).
        task_weights: ``fixed``: task name → weight (others 1).
        uncertainty_clip: ``uncertainty``: lower bound of the log-variance regulariser.
        task_weighting_options: further :class:`~lineside.fusion.task_weighting.TaskWeighting` options
            (``gradnorm``: ``alpha``, ``lr``, ``shared_layer``; ``upgrad``: ``max_accumulate``).
        distill: train as a student of a frozen teacher (:class:`~lineside.fusion.distillation.Distillation`
            arguments: ``teacher`` checkpoint, ``temperature``, ``alpha`` …); the teacher is not part of
            this module's weights or checkpoint.
        adapter: train a LoRA adapter on a frozen base (:class:`~lineside.fusion.adapters.LoraAdapter`
            fields: ``base`` checkpoint, ``rank``, ``alpha``, ``targets`` …); the fit writes
            ``adapter.safetensors`` in its run folder.
        init_from: start from this checkpoint's weights (e.g. a pruned one from ``lineside prune``,
            whose channel counts the model takes).
        domain_transfer: a :class:`~lineside.fusion.transfer.DomainTransferCriterion`: training batches are
            dicts of labelled / source / unlabelled batches (:class:`~lineside.fusion.transfer_datamodule.TransferDataModule`)
            and its MMD / contrastive terms join the task losses; not part of the exported model.
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
        localization_criterion: nn.Module | None = None,
        box_class_names: list[str] | None = None,
        top_k: int = 100,
        grasp_criterion: GraspCriterion | None = None,
        grasp_top_k: int = 5,
        grasp_nms_radius: float = 0.01,
        coverage_radius: float = 0.02,
        criteria: dict[str, nn.Module] | None = None,
        task_weighting: Literal["sum", "fixed", "uncertainty", "gradnorm", "upgrad"] = "sum",
        task_weights: dict[str, float] | None = None,
        uncertainty_clip: float = 0.0,
        task_weighting_options: dict | None = None,
        distill: dict | None = None,
        adapter: dict | None = None,
        init_from: str | None = None,
        domain_transfer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # from the CLI "model" is its class_path config; else drop the object
            self.save_hyperparameters()
        for key in ("model", "criterion", "localization_criterion", "grasp_criterion", "criteria", "domain_transfer"):
            value = self.hparams.get(key)
            if isinstance(value, nn.Module) or (isinstance(value, dict) and any(isinstance(v, nn.Module) for v in value.values())):
                del self.hparams[key]
        self.model = model
        self.domain_transfer = domain_transfer
        # init_from / adapter: load weights (re-shaping a pruned model), wrap with LoRA; kept in checkpoints
        from lineside.fusion.adapters import prepare_weights

        self.adaptation = prepare_weights(model, init_from, adapter)
        self.tta_views, self.top_k = tta_views, top_k
        self.settings = TaskSettings(tta_views=tta_views, top_k=top_k, grasp_top_k=grasp_top_k, grasp_nms_radius=grasp_nms_radius,
                                     grade_heatmap=False, coverage_radius=coverage_radius)
        given = {"grading": criterion, "localization": localization_criterion, "grasp": grasp_criterion, **(criteria or {})}
        tasks = model.tasks
        self.criteria = nn.ModuleDict({t.name: given.get(t.name) or t.criterion() for t in tasks})
        self.metrics = nn.ModuleDict({s: nn.ModuleDict({t.name: t.metrics(self.settings) for t in tasks}) for s in ("val", "test")})
        self.label_names = {t.name: t.label_names() for t in tasks}
        self.label_names.update({k: list(v) for k, v in (("grading", class_names), ("localization", box_class_names)) if v})
        self.optimizer_factory, self.scheduler_factory, self.backbone_lr_scale = optimizer, scheduler, backbone_lr_scale
        self._deployables: dict[tuple, DeployableModel] = {}
        self.task_weighting = TaskWeighting(model.task_names, task_weighting, task_weights, uncertainty_clip,
                                            **(task_weighting_options or {}))
        self.task_weighting.bind(model)  # gradnorm / upgrad: the shared parameters
        self.automatic_optimization = task_weighting != "upgrad"  # upgrad steps in TaskWeighting.manual_step
        # (losses, out, batch) -> losses, after the task losses: distillation (below), EWC (fusion.continual callback)
        self.loss_hooks: list = []
        if distill:
            from lineside.fusion.distillation import Distillation

            self.loss_hooks.append(Distillation(**distill))

    @property
    def class_names(self) -> list[str]:
        return self.label_names.get("grading", [])

    @property
    def box_class_names(self) -> list[str]:
        return self.label_names.get("localization", [])

    # -- setup -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """The data module's task must be one of the model's; that task checks the data fits its head.
        A multi-task data module (``task_data()``) gives one data module per task, each checked so."""
        self._find_unused_parameters_under_ddp()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        pairs = dm.task_data() if callable(getattr(dm, "task_data", None)) else [(getattr(dm, "task", "grading"), dm)]
        for kind, data in pairs:
            self._configure_task(kind, data, stage)

    def _find_unused_parameters_under_ddp(self) -> None:
        """Under DDP, a multi-task model's heads get no gradient from a batch of another task's data
        (it adds no loss for them), which plain DDP refuses at the next step. DDP is told to look for
        unused parameters (``strategy=ddp_find_unused_parameters_true``) before it wraps the model,
        unless the strategy was given ``find_unused_parameters`` or ``static_graph`` itself. Unused
        parameters keep no gradient, so the optimizer skips them as on one process."""
        from lightning.pytorch.strategies import DDPStrategy

        strategy = getattr(self._trainer, "strategy", None)
        if not isinstance(strategy, DDPStrategy) or len(self.model.tasks) < 2:
            return
        kwargs = strategy._ddp_kwargs
        if "find_unused_parameters" not in kwargs and not kwargs.get("static_graph"):
            kwargs["find_unused_parameters"] = True
            rank_zero_info(f"DDP: find_unused_parameters=True (tasks {self.model.task_names}: a batch trains only the tasks it has labels for)")

    def _configure_task(self, kind: str, dm, stage: str) -> None:
        if kind == "grading" and not hasattr(dm, "num_classes"):
            return
        task = next((t for t in self.model.tasks if t.name == kind), None)
        if task is None:
            cls = task_type(kind)
            raise ValueError(f"data {dm.source} carries {cls.data_hint} but the model has no {kind} head: set "
                             f"model.init_args.model.init_args.{cls.slot or 'heads.' + kind} (and the encoder it reads)")
        names = task.configure(dm, stage, self.criteria[task.name], [self.metrics[s][task.name] for s in ("val", "test")])
        if names is not None:
            self.label_names[task.name] = names

    # -- training --------------------------------------------------------------------------
    def _losses(self, out, batch: dict) -> dict[str, torch.Tensor]:
        """Every supervised task's terms, its subtotal ``loss_<task>`` and ``loss`` (their sum)."""
        losses: dict[str, torch.Tensor] = {}
        parts, labelled = {}, set()
        for task in self.model.tasks:
            terms = task.loss(self.criteria[task.name], out, batch)
            if terms is not None:
                parts[task.name] = terms.pop("loss")
                if task.labelled(batch):  # a batch of another data set's samples: its zero is not logged
                    labelled.add(task.name)
                    losses.update(terms)
        if not parts:
            raise ValueError(f"the batch supervises none of the model's tasks {self.model.task_names} (keys: {sorted(batch)})")
        losses.update({f"loss_{name}": v for name, v in parts.items() if name in labelled})
        losses["loss"] = self.task_weighting(parts, labelled)
        if self.task_weighting.method != "sum":
            weights = self.task_weighting.weights()
            losses.update({f"weight_{name}": weights[name] for name in labelled})
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.domain_transfer is not None and "labelled" in batch:  # TransferDataModule's dict of batches
            return self.domain_transfer.training_step(self, batch)
        out = self.model(**self.model.batch_inputs(batch))
        losses = self._losses(out, batch)
        for hook in self.loss_hooks:
            losses = hook(losses, out, batch)
        n = len(batch["image"] if "image" in batch else batch["points"])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=False, batch_size=n)
        self.log("loss", losses["loss"], prog_bar=True, logger=False, batch_size=n)
        if not self.automatic_optimization:  # upgrad: per-task gradients, aggregated, stepped there
            self.task_weighting.manual_step(self, losses)
        return losses["loss"]

    # -- evaluation: the deployable module, fp32 ---------------------------------------------
    def deployable(self, batch: dict) -> DeployableModel:
        """The model's deployable module for this batch's frame size / cloud size (cached)."""
        key = tuple(tuple(batch[k].shape[1:]) if k in batch else None for k in ("image", "points")) + (str(self.device),)
        if key not in self._deployables:
            self._deployables[key] = DeployableModel.for_batch(self.model, batch, self.settings, self.class_names, self.box_class_names)
        return self._deployables[key]

    def decode(self, batch: dict) -> dict[str, torch.Tensor]:
        """The deployable module's named outputs on a batch, in fp32 with autocast off."""
        text = batch.get("text") if self.model.text_encoder is not None else None
        with torch.autocast(self.device.type, enabled=False):
            return self.deployable(batch).evaluate(batch_inputs(batch), text)

    def _evaluate(self, batch: dict, stage: str) -> None:
        decoded = self.decode(batch)
        for task in self.model.tasks:
            if task.supervised(batch) and task.predictions(decoded):
                task.update(self.metrics[stage][task.name], decoded, batch)

    def _log_metrics(self, stage: str) -> None:
        for task in self.model.tasks:
            metrics = self.metrics[stage][task.name]
            values = task.compute(metrics, stage, self.label_names[task.name])
            for name, value in values.items():
                # torchmetrics already synced the value across DDP processes; sync_dist only says so (no warning)
                self.log(task.metric_key(stage, name), value, prog_bar=stage == "val" and name in task.progress, sync_dist=True)
            if values and stage == "test" and self.trainer.is_global_zero:
                task.report(metrics, self.label_names[task.name], self.trainer.log_dir)
            metrics.reset()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_start(self) -> None:
        rank_zero_info(f"test: metrics of the deployable module ({EVAL_PRECISION}, tta_views={self.tta_views}) "
                       "on every batch, as lineside score computes them")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        decoded = self.decode(batch)
        result = {"path": batch["path"] if "path" in batch else batch.get("mesh")}
        for task in self.model.tasks:
            result.update(task.predictions(decoded))
        return result

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        encoder = self.model.image_encoder
        backbone = [p for p in encoder.backbone.parameters() if p.requires_grad] if encoder is not None else []
        ids = {id(p) for p in backbone}
        rest = [p for p in self.model.parameters() if id(p) not in ids and p.requires_grad]
        rest += list(self.task_weighting.parameters())  # uncertainty weighting's log-variances
        rest += list(self.domain_transfer.parameters()) if self.domain_transfer is not None else []  # its projection head
        optimizer = self.optimizer_factory([{"params": rest, "name": "head"},
                                            {"params": backbone, "name": "backbone", "lr_scale": self.backbone_lr_scale}])
        for g in optimizer.param_groups:  # schedulers take these as their initial LRs
            g["lr"] = g["lr"] * g.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # class weights are recomputed from the data at each fit start; older checkpoints stored them
        checkpoint["state_dict"].pop("criterion.class_weights", None)
        if (checkpoint.get("lineside") or {}).get("pruned"):  # `lineside prune`: take the saved channel counts
            from lineside.fusion.pruning import fit_to_state

            fit_to_state(self.model, {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")})
        qat = checkpoint.get("lineside_qat")
        if qat and any(hasattr(m, "weight_quant") for m in self.model.modules()):  # QAT run (fusion.qat): its quantizers sit beside the weights
            checkpoint["state_dict"].update({f"model.{k}": v for k, v in qat["state"].items()})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        config = self.hparams.get("model")
        checkpoint["lineside"] = {
            "class_names": self.class_names, "image_size": getattr(dm, "image_size", None), "channels": self.model.in_chans,
            "tta_views": self.tta_views, "box_class_names": self.box_class_names, "tasks": self.model.task_names,
            "model_config": config if isinstance(config, dict) else None,
        }
        for task in self.model.tasks:  # what each task needs recorded (the grasp task: the point side)
            data = dm.for_task(task.name) if callable(getattr(dm, "for_task", None)) else dm
            checkpoint["lineside"].update(task.checkpoint_record(data or dm, self.settings))
        checkpoint["lineside"].update(self.adaptation)  # pruned channel counts, LoRA adapter settings

    def on_fit_end(self) -> None:
        if self.adaptation.get("adapter") and self.trainer.is_global_zero:  # the best checkpoint's adapter, beside the run
            from lineside.fusion.adapters import write_run_adapter

            best = getattr(self.trainer.checkpoint_callback, "best_model_path", None)
            path = write_run_adapter(self.model, self.adaptation["adapter"], self.trainer.default_root_dir, best)
            rank_zero_info(f"adapter written: {path} ({os.path.getsize(path) / 1e6:.2f} MB)")

