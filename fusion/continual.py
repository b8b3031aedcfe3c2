"""Continual learning: new defect classes absorbed by a trained model without forgetting the old ones.

A model trained on some classes (step 1) learns more classes from new images (step 2). Plain
fine-tuning on the new images forgets the old classes: nothing in the new data asks the model to
keep them, and the old classes' heatmap channels only ever see negatives. Three remedies here,
usable alone or together:

* **class expansion** (:func:`expand_classes`, :func:`load_expanded_state_dict`,
  :class:`InitFromCheckpoint`): the step-2 head has more output classes; the old classes' rows of
  the class layer are copied from step 1, the new rows start as a fresh head's;
* **EWC** (:class:`ElasticWeightConsolidation`, Kirkpatrick et al. 2017): the diagonal Fisher
  information ``F`` of the step-1 weights ``θ*`` on the step-1 data, computed at the end of step 1
  (or from a step-1 checkpoint), adds ``λ · Σ_i F_i (θ_i − θ*_i)²`` to every step-2 training loss;
* **replay** (:class:`ContinualDetectionDataModule` ``replay_fraction``): a small, class-stratified
  share of the step-1 training images, with their old labels, is mixed into the step-2 training set.

The class split of a data set lives in :class:`ContinualDetectionDataModule` (``classes`` = the label
space of the head, ``train_classes`` = the classes labelled in this step's train/val images); the
test split keeps every image and labels all of ``classes``, so per-class AP after step 1 and after
step 2 are measured on the same images. Recipe and measured figures: ``docs/continual-distill.md``.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from lineside.fusion.checkpoint_file import read_checkpoint
from lineside.fusion.detection_datamodule import DetectionDataModule
from lineside.fusion.grading_head import GradingHead
from lineside.fusion.localization_head import HEATMAP_PRIOR_BIAS, LocalizationHead
from lineside.vision.box_records import DetectionRecord

__all__ = [
    "ContinualDetectionDataModule",
    "ElasticWeightConsolidation",
    "InitFromCheckpoint",
    "diagonal_fisher",
    "ewc_penalty",
    "expand_classes",
    "load_expanded_state_dict",
    "relabel_records",
    "replay_buffer",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- class expansion


def _grown(old: Tensor, rows: int, init: Callable[[Tensor], None]) -> Tensor:
    """``old`` with ``rows`` rows in dim 0: its own rows first, the rest filled by ``init``."""
    new = torch.empty((rows, *old.shape[1:]), dtype=old.dtype, device=old.device)
    init(new)
    new[: old.shape[0]] = old.detach()
    return new


def expand_classes(head: nn.Module, num_classes: int) -> nn.Module:
    """Grow a head's class dimension to ``num_classes`` in place, keeping the old classes' weights.

    Rows ``0 … C_old − 1`` of the class layer are the old ones, unchanged, so the old classes'
    outputs stay identical on any input; the new rows start as a freshly built head's would.

    - :class:`~lineside.fusion.localization_head.LocalizationHead` (CenterNet-style): the last 1×1 conv
      of the heatmap branch (C, hidden, 1, 1) → (num_classes, hidden, 1, 1); new rows N(0, 0.01), bias
      ``HEATMAP_PRIOR_BIAS``. The tower, size, offset and defect branches are class-agnostic.
    - :class:`~lineside.fusion.grading_head.GradingHead`: the classifier ``fc`` (K, 2D) → (num_classes,
      2D); new rows trunc-normal(0.02), bias 0.

    Returns the head. Raises ``ValueError`` when ``num_classes`` is below the current count and
    ``TypeError`` for a head without a known class layer.
    """
    if isinstance(head, LocalizationHead):
        old, attr = head.num_classes, "num_classes"
        layer: nn.Module = head.heatmap[-1]

        def init_w(t: Tensor) -> None:
            nn.init.normal_(t, std=0.01)

        def init_b(t: Tensor) -> None:
            nn.init.constant_(t, HEATMAP_PRIOR_BIAS)

        new_layer: nn.Module = nn.Conv2d(layer.in_channels, num_classes, kernel_size=1)
    elif isinstance(head, GradingHead):
        old, attr = head.num_grades, "num_grades"
        layer = head.fc

        def init_w(t: Tensor) -> None:
            nn.init.trunc_normal_(t, std=0.02)

        def init_b(t: Tensor) -> None:
            nn.init.zeros_(t)

        new_layer = nn.Linear(layer.in_features, num_classes)
    else:
        raise TypeError(f"expand_classes: no class layer known for {type(head).__name__} "
                        "(supported: LocalizationHead, GradingHead)")
    if num_classes < old:
        raise ValueError(f"expand_classes: {type(head).__name__} has {old} classes; cannot shrink to {num_classes}")
    if num_classes == old:
        return head
    new_layer = new_layer.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new_layer.weight.copy_(_grown(layer.weight, num_classes, init_w))
        new_layer.bias.copy_(_grown(layer.bias, num_classes, init_b))
    if isinstance(head, LocalizationHead):
        head.heatmap[-1] = new_layer
    else:
        head.fc = new_layer
    setattr(head, attr, num_classes)
    return head


def load_expanded_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "state dict") -> list[str]:
    """Load ``state`` (a model with fewer classes) into ``model``, copying old rows into grown tensors.

    A tensor whose shape differs from the model's only in dim 0, with fewer rows, fills the first
    rows (the class layers of :func:`expand_classes`); the other rows keep the model's own init.
    Any other missing, unexpected or mismatched tensor raises ``ValueError`` naming ``source``.
    Returns the names of the grown tensors.
    """
    own = model.state_dict()
    grown, ready, wrong = [], {}, []
    for name, value in state.items():
        target = own.get(name)
        if target is None:
            continue
        if target.shape == value.shape:
            ready[name] = value
        elif value.dim() == target.dim() and value.shape[1:] == target.shape[1:] and value.shape[0] < target.shape[0]:
            merged = target.clone()
            merged[: value.shape[0]] = value
            ready[name] = merged
            grown.append(name)
        else:
            wrong.append(f"{name} {tuple(value.shape)} vs {tuple(target.shape)}")
    missing = sorted(set(own) - set(ready))
    unexpected = sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        raise ValueError(f"{source}: weights do not fit the model (shape mismatches {wrong[:4]}, missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}); only class rows (dim 0 of a class layer) may grow")
    model.load_state_dict(ready)
    return grown


def _model_state(path: str | os.PathLike, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """The pure model's weights (``model.`` prefix removed) from a ``lineside fit`` checkpoint."""
    ckpt = read_checkpoint(path, "cpu", trust_checkpoint)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not state:
        raise ValueError(f"{path}: no state_dict inside; give a checkpoint written by `lineside fit`")
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


class InitFromCheckpoint(L.Callback):
    """Start a fit from a previous step's checkpoint, its class layers grown to this model's classes.

    At fit setup the weights of ``checkpoint`` are loaded into ``pl_module.model`` with
    :func:`load_expanded_state_dict` (old class rows copied, new rows freshly initialised). Not a
    resume: optimizer, scheduler and epoch start anew (``--ckpt_path`` resumes a run instead).

    Args:
        checkpoint: the previous step's ``.ckpt`` (e.g. ``runs/neu_det_step1/checkpoints/last.ckpt``).
        trust_checkpoint: load a pickle that holds more than weights (see ``lineside.fusion.checkpoint_file``).
    """

    def __init__(self, checkpoint: str, trust_checkpoint: bool = False) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.trust_checkpoint = trust_checkpoint

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f"InitFromCheckpoint: {self.checkpoint} not found; run the previous step first")
        grown = load_expanded_state_dict(pl_module.model, _model_state(self.checkpoint, self.trust_checkpoint), self.checkpoint)
        log.info("weights from %s (class rows grown: %s)", self.checkpoint, grown or "none")


# ----------------------------------------------------------------------------- EWC


def diagonal_fisher(model: nn.Module, loss_fn: Callable[[dict], Tensor], batches: Iterable[dict], max_batches: int | None = None,
                    normalize: bool = True) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of ``model``'s trainable parameters: the mean over batches of the
    squared gradient of ``loss_fn(batch)``.

    Batches are taken as they come (batch-level gradients, the usual cheap estimate; per-sample
    gradients would cost a backward per image). With ``normalize`` the result is divided by its
    mean over every entry, so an EWC weight ``λ`` reads the same whatever the loss scale.
    The model's train/eval mode is left as found; gradients are cleared afterwards.

    Returns: parameter name → tensor of the parameter's shape (≥ 0).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    with torch.enable_grad():
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                raise ValueError(f"diagonal_fisher: the loss of batch {count} is {float(loss)}")
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2
            count += 1
    model.zero_grad(set_to_none=True)
    if not count:
        raise ValueError("diagonal_fisher: no batches")
    fisher = {n: f / count for n, f in fisher.items()}
    if normalize:
        total = sum(float(f.sum()) for f in fisher.values())
        size = sum(f.numel() for f in fisher.values())
        scale = size / total if total > 0 else 1.0
        fisher = {n: f * scale for n, f in fisher.items()}
    return fisher


def ewc_penalty(named_parameters: Iterable[tuple[str, Tensor]], fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
    """``Σ_i F_i (θ_i − θ*_i)²`` over the parameters that have a Fisher entry.

    A parameter grown since step 1 (more class rows, :func:`expand_classes`) is compared on its
    first rows only: the new rows have no step-1 value and are free. Zero at ``θ = θ*``, quadratic
    in the distance from it.
    """
    total: Tensor | None = None
    for name, p in named_parameters:
        f = fisher.get(name)
        if f is None:
            continue
        star = anchor[name]
        q = p[: star.shape[0]] if p.shape != star.shape else p
        term = (f.to(q.device, q.dtype) * (q - star.to(q.device, q.dtype)) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("ewc_penalty: no parameter of the model has a Fisher entry (names differ from step 1?)")
    return total


class ElasticWeightConsolidation(L.Callback):
    """EWC as a Lightning callback: computes the Fisher at the end of a step, and/or adds the penalty.

    **Step 1** (``save_fisher``): when training ends, the diagonal Fisher of the trained weights
    (:func:`diagonal_fisher`, the module's own training loss over ``fisher_batches`` training
    batches, eval mode) and the weights ``θ*`` are written to ``save_fisher`` (default
    ``<run>/fisher.pt``).

    **Step 2** (``weight`` > 0): the Fisher and ``θ*`` come from ``fisher`` (a file written in step 1),
    or, when ``fisher`` is a ``.ckpt``, are computed at fit start from that checkpoint's weights on
    this fit's training batches (a stand-in when the step-1 data is gone). Every training step's loss
    then gains ``loss_ewc = weight · Σ F (θ − θ*)²`` (logged as ``train/loss_ewc``), through the
    LightningModule's ``loss_hooks``.

    Args:
        weight: λ; 0 = no penalty (Fisher still saved when asked).
        fisher: step-1 Fisher file (``fisher.pt``) or a step-1 checkpoint.
        save_fisher: where to write this fit's Fisher at its end; ``True`` = ``<run>/fisher.pt``.
        fisher_batches: training batches the Fisher is averaged over.
        trust_checkpoint: as :class:`InitFromCheckpoint`.
    """

    def __init__(self, weight: float = 0.0, fisher: str | None = None, save_fisher: str | bool | None = None,
                 fisher_batches: int = 50, trust_checkpoint: bool = False) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"EWC weight must be >= 0, got {weight}")
        if weight > 0 and not fisher:
            raise ValueError("EWC weight > 0 needs fisher: the step-1 fisher.pt (save_fisher in step 1) or a step-1 checkpoint")
        self.weight, self.fisher_path, self.save_fisher = float(weight), fisher, save_fisher
        self.fisher_batches, self.trust_checkpoint = fisher_batches, trust_checkpoint
        self.fisher: dict[str, Tensor] | None = None
        self.anchor: dict[str, Tensor] | None = None
        self._module: L.LightningModule | None = None

    # -- the penalty -----------------------------------------------------------------------
    def penalty(self, model: nn.Module) -> Tensor:
        """``weight · Σ F (θ − θ*)²`` of ``model`` (its current parameters)."""
        if self.fisher is None or self.anchor is None:
            raise RuntimeError("ElasticWeightConsolidation: no Fisher loaded (fit not started?)")
        return self.weight * ewc_penalty(model.named_parameters(), self.fisher, self.anchor)

    def __call__(self, losses: dict[str, Tensor], out, batch: dict) -> dict[str, Tensor]:
        """Loss hook of :class:`~lineside.fusion.lightning_module.InspectionModule`: adds ``loss_ewc``."""
        assert self._module is not None
        term = self.penalty(self._module.model)
        losses["loss_ewc"] = term
        losses["loss"] = losses["loss"] + term
        return losses

    # -- Lightning hooks -------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.weight <= 0:
            return
        path = Path(self.fisher_path)
        if not path.is_file():
            raise FileNotFoundError(f"EWC fisher {path} not found; run step 1 with save_fisher, or give its checkpoint")
        if path.suffix == ".ckpt":
            self.anchor, self.fisher = self._fisher_of_checkpoint(trainer, pl_module, path)
        else:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or not {"fisher", "anchor"} <= set(saved):
                raise ValueError(f"{path}: not an EWC Fisher file (needs 'fisher' and 'anchor'; written by save_fisher)")
            self.fisher, self.anchor = saved["fisher"], saved["anchor"]
        self.fisher = {k: v.to(pl_module.device) for k, v in self.fisher.items()}
        self.anchor = {k: v.to(pl_module.device) for k, v in self.anchor.items()}
        known = {n for n, _ in pl_module.model.named_parameters()}
        if not set(self.fisher) & known:
            raise ValueError(f"{path}: none of its parameter names are in this model (a different architecture?)")
        self._module = pl_module
        hooks = getattr(pl_module, "loss_hooks", None)
        if hooks is None:
            raise TypeError(f"{type(pl_module).__name__} has no loss_hooks; EWC needs lineside's InspectionModule")
        if self not in hooks:
            hooks.append(self)
        log.info("EWC: λ=%g over %d tensors from %s", self.weight, len(self.fisher), path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hooks = getattr(pl_module, "loss_hooks", None)
        if hooks is not None and self in hooks:
            hooks.remove(self)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.save_fisher:
            return
        out = Path(trainer.default_root_dir) / "fisher.pt" if self.save_fisher is True else Path(self.save_fisher)
        fisher = self._fisher(trainer, pl_module)
        anchor = {n: p.detach().cpu().clone() for n, p in pl_module.model.named_parameters() if n in fisher}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        torch.save({"fisher": {k: v.cpu() for k, v in fisher.items()}, "anchor": anchor, "batches": self.fisher_batches}, tmp)
        os.replace(tmp, out)
        log.info("EWC: Fisher of %d tensors written to %s", len(fisher), out)
        print(f"EWC Fisher ({len(fisher)} tensors) → {out}")

    def _fisher(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor]:
        dm = trainer.datamodule
        loader = dm.train_dataloader() if dm is not None else trainer.train_dataloader
        was_training = pl_module.training
        pl_module.eval()
        device = pl_module.device

        def loss_fn(batch: dict) -> Tensor:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            out = pl_module.model(**pl_module.model.batch_inputs(batch))
            return pl_module._losses(out, batch)["loss"]

        try:
            from tqdm.auto import tqdm

            n = min(self.fisher_batches, len(loader))
            return diagonal_fisher(pl_module.model, loss_fn, tqdm(loader, total=n, desc="EWC Fisher", leave=False), n)
        finally:
            pl_module.train(was_training)

    def _fisher_of_checkpoint(self, trainer, pl_module, path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        current = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        load_expanded_state_dict(pl_module.model, _model_state(path, self.trust_checkpoint), str(path))
        old = _model_state(path, self.trust_checkpoint)
        try:
            fisher = self._fisher(trainer, pl_module)
        finally:
            pl_module.model.load_state_dict(current)
        # the checkpoint's rows only: grown rows did not exist in step 1
        fisher = {n: f[: old[n].shape[0]] if n in old and f.shape != old[n].shape else f for n, f in fisher.items() if n in old}
        anchor = {n: old[n].float() for n in fisher}
        return anchor, fisher


# ----------------------------------------------------------------------------- data: class steps and replay


def relabel_records(records: Sequence[DetectionRecord], keep: Sequence[int], index: dict[int, int],
                    drop_unlabelled: bool) -> list[DetectionRecord]:
    """Records with only the boxes whose label is in ``keep``, relabelled by ``index`` (old → new label).

    With ``drop_unlabelled`` an image left without boxes is dropped (a step's training images are
    those showing its classes); otherwise it stays as a defect-free image (test: every image).
    """
    keep_set = set(int(k) for k in keep)
    out = []
    for r in records:
        sel = np.array([int(l) in keep_set for l in r.labels], dtype=bool)
        if drop_unlabelled and not sel.any():
            continue
        labels = np.array([index[int(l)] for l in r.labels[sel]], dtype=np.int64)
        out.append(DetectionRecord(r.path, r.boxes[sel].reshape(-1, 4), labels, r.width, r.height, r.mask_path,
                                   r.group, r.image_class, r.annotation))
    return out


def replay_buffer(records: Sequence[DetectionRecord], fraction: float, seed: int = 0) -> list[DetectionRecord]:
    """A class-stratified random ``fraction`` of ``records`` (at least one image when ``fraction`` > 0).

    Strata: each record's ``image_class`` (else its most frequent box label); ``round(fraction · n)``
    images in all, shared out over the strata in proportion to their sizes (largest remainders).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"replay fraction must be in [0, 1], got {fraction}")
    if fraction == 0 or not records:
        return []
    strata: dict[str, list[DetectionRecord]] = defaultdict(list)
    for r in records:
        key = r.image_class or (str(np.bincount(r.labels).argmax()) if len(r.labels) else "")
        strata[key].append(r)
    total = max(1, round(fraction * len(records)))
    shares = {k: total * len(v) / len(records) for k, v in strata.items()}
    counts = {k: int(math.floor(s)) for k, s in shares.items()}
    for k in sorted(shares, key=lambda k: (counts[k] - shares[k], k))[: total - sum(counts.values())]:
        counts[k] += 1
    rng = random.Random(seed)
    picked: list[DetectionRecord] = []
    for k in sorted(strata):
        picked += rng.sample(strata[k], min(counts[k], len(strata[k])))
    return picked


class ContinualDetectionDataModule(DetectionDataModule):
    """A :class:`DetectionDataModule` for one step of class-incremental training.

    The data set is split as the plain module splits it (same seed, same images per split); then

    - every split keeps only boxes of ``classes`` (the head's label space, in this order);
    - ``train`` and ``val`` keep only boxes of ``train_classes`` (default: all of ``classes``) and only
      the images that show one, as a step sees only images of the defects it is taught;
    - ``test`` keeps every image (those without a box of ``classes`` are defect-free for this
      label space), so per-class AP is comparable across steps;
    - with ``replay_fraction`` > 0, a class-stratified share (:func:`replay_buffer`) of the
      images that ``replay_classes`` had in train — with boxes of ``replay_classes`` only — is
      mixed into ``train``: the fraction is of the previous step's training images.

    Args:
        classes: class names of the head, in label order (default: all of the data set's).
        train_classes: the classes labelled in this step's train/val images.
        replay_fraction: share of the previous step's training images replayed (0 = none).
        replay_classes: the previous step's classes (needed with ``replay_fraction``).
        other arguments: as :class:`DetectionDataModule`.
    """

    def __init__(
        self,
        dataset: Literal["neu_det", "magnetic_tile", "deeppcb"] = "neu_det",
        root: str | None = None,
        image_size: int = 192,
        channels: int = 1,
        batch_size: int = 16,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        limit: int | None = None,
        predict_split: Literal["train", "val", "test"] = "test",
        classes: list[str] | None = None,
        train_classes: list[str] | None = None,
        replay_fraction: float = 0.0,
        replay_classes: list[str] | None = None,
    ) -> None:
        super().__init__(dataset, root, image_size, channels, batch_size, num_workers, val_fraction, test_fraction,
                         seed, limit, predict_split)
        if replay_fraction and not replay_classes:
            raise ValueError("data.replay_fraction needs data.replay_classes (the previous step's classes)")
        if not 0.0 <= replay_fraction <= 1.0:
            raise ValueError(f"data.replay_fraction must be in [0, 1], got {replay_fraction}")
        self.classes, self.train_classes = classes, train_classes
        self.replay_fraction, self.replay_classes = replay_fraction, replay_classes
        self._step_splits: dict[str, list[DetectionRecord]] | None = None
        self.replayed: list[DetectionRecord] = []

    def prepare_splits(self) -> dict[str, list[DetectionRecord]]:
        if self._step_splits is not None:
            return self._step_splits
        limit, self.limit = self.limit, None  # the limit applies to this step's images, after the class filter
        try:
            splits = super().prepare_splits()
        finally:
            self.limit = limit
        names = list(self._class_names or [])
        classes = list(self.classes or names)
        train_classes = list(self.train_classes or classes)

        def ids(group: Sequence[str], what: str) -> list[int]:
            unknown = [c for c in group if c not in names]
            if unknown:
                raise ValueError(f"data.{what}: {unknown} are not classes of {self.source} ({names})")
            return [names.index(c) for c in group]

        head = ids(classes, "classes")
        if not set(ids(train_classes, "train_classes")) <= set(head):
            raise ValueError(f"data.train_classes {train_classes} must be among data.classes {classes}")
        index = {c: i for i, c in enumerate(head)}
        taught = ids(train_classes, "train_classes")
        out = {
            "train": relabel_records(splits["train"], taught, index, drop_unlabelled=True),
            "val": relabel_records(splits["val"], taught, index, drop_unlabelled=True),
            "test": relabel_records(splits["test"], head, index, drop_unlabelled=False),
        }
        if self.replay_fraction:
            old = ids(self.replay_classes or [], "replay_classes")
            if not set(old) <= set(head):
                raise ValueError(f"data.replay_classes {self.replay_classes} must be among data.classes {classes}")
            previous = relabel_records(splits["train"], old, index, drop_unlabelled=True)
            self.replayed = replay_buffer(previous, self.replay_fraction, self.seed)
            out["train"] = out["train"] + self.replayed
            log.info("replay: %d of %d previous-step training images mixed into %d new ones", len(self.replayed),
                     len(previous), len(out["train"]) - len(self.replayed))
        if self.limit:
            out = {s: v[: self.limit] for s, v in out.items()}
        for split in ("train", "val"):
            if not out[split]:
                raise ValueError(f"{self.source}: no {split} images show a box of {train_classes}")
        log.info("continual step: classes %s, taught %s: %s", classes, train_classes, {s: len(v) for s, v in out.items()})
        self._class_names = classes
        self._step_splits = out
        self.splits = out
        return out

    @property
    def class_names(self) -> list[str]:
        self.prepare_splits()
        return list(self._class_names or [])
