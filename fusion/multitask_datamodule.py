"""MultiTaskDataModule: named data modules (one per labelled dataset) trained together, one model, many tasks.

Each member is a data module of its own (``class_path`` in YAML: :class:`InspectionDataModule` for
ELPV grades, :class:`DetectionDataModule` for boxes and masks …) and keeps its split logic, its
transforms, its image size and its labels. Training batches each come from one member, so the
shapes of a batch agree; which member gives the next batch is drawn in proportion to ``weights``
(seeded, one fixed order per epoch). Validation and test give one loader per member (Lightning's
``dataloader_idx``), so each task's metrics come from its own held-out data.

A sample carries only the labels its dataset has (an ELPV cell a ``grade``, a cracked-cell image its
masks): a task adds loss only on batches that carry its labels, and every criterion masks the
samples that lack them (``grade = -1``, ``has_boxes`` / ``has_mask`` False).

A member's dataset says which heads it trains: ``tasks`` maps it to a task name. A member of a named
task (``grading/xray``) has its labels moved under that task's batch keys (``grade`` → ``grade/xray``,
:meth:`~lineside.fusion.tasks.base.Task.batch_key`), in training, validation, test and predict alike,
so the castings' two grades train the ``grading/xray`` head and never the ELPV ``grading/el`` one.
``prompts`` gives a member's samples a text (``"casting radiograph"``; ``{text}`` in it is replaced by
the sample's own text, ELPV's cell type), which a model with a text encoder reads.

    data:
      class_path: lineside.fusion.multitask_datamodule.MultiTaskDataModule
      init_args:
        datasets:
          elpv: {class_path: lineside.fusion.datamodule.InspectionDataModule, init_args: {image_size: 224, split: block}}
          tiles: {class_path: lineside.fusion.detection_datamodule.DetectionDataModule, init_args: {dataset: magnetic_tile}}
        weights: {elpv: 2.0, tiles: 1.0}
        tasks: {elpv: grading/el, castings: grading/xray}        # named grading tasks, one head each
        prompts: {elpv: "EL cell, {text}", castings: casting radiograph}
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from lineside.fusion.tasks import task_type

__all__ = ["MemberBatches", "MemberLabels", "MultiTaskDataModule", "shard_loader"]


def shard_loader(loader: DataLoader, rank: int, world_size: int, seed: int = 0) -> DataLoader:
    """``loader`` over process ``rank``'s share of its dataset (DDP): a ``DistributedSampler``,
    shuffled when ``loader`` shuffled (seeded with ``seed``; :class:`MemberBatches` sets its epoch
    at every new pass), its batch size, collate function, workers and ``drop_last`` kept."""
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers)


class MemberLabels:
    """One member's batches in the vocabulary of the task it supervises, with its prompt.

    A named task's label and target keys move under its suffixed keys (``grading/xray``: ``grade`` →
    ``grade/xray``; :attr:`Task.label_key` and :attr:`Task.target_keys` of the task's kind); the
    plain task (``grading``) keeps them. With a ``prompt`` every sample's ``text`` becomes the prompt,
    ``{text}`` in it replaced by the sample's own text (empty when it has none).

    Args:
        task: the task name the member's labels supervise (``grading``, ``grading/xray`` …).
        prompt: text for every sample of the member; None keeps the samples' own texts.
    """

    def __init__(self, task: str, prompt: str | None = None) -> None:
        kind, _, qualifier = task.partition("/")
        cls = task_type(kind)  # an unknown kind raises here, naming the registered ones
        keys = (cls.label_key, *cls.target_keys)
        self.task, self.prompt = task, prompt
        self.moves = {k: f"{k}/{qualifier}" for k in keys} if qualifier else {}

    def __call__(self, batch: Any) -> Any:
        if not isinstance(batch, dict):
            return batch
        out = dict(batch)
        for key, named in self.moves.items():
            if key in out:
                out[named] = out.pop(key)
        if self.prompt is not None:
            n = len(out["image"]) if "image" in out else len(out["points"]) if "points" in out else len(out.get("path") or [])
            own = out.get("text") or [""] * n
            out["text"] = [self.prompt.replace("{text}", str(t or "")).strip(" ,") for t in own]
        return out

    def __repr__(self) -> str:
        return f"MemberLabels({self.task!r}, prompt={self.prompt!r})"


class MemberBatches:
    """Training batches drawn from several loaders, each batch one loader's.

    Every epoch (one ``iter``) draws ``steps`` batches: loader ``k`` gives ``round(steps · w_k / Σw)``
    of them (largest remainders settle the rounding) in an order shuffled by a generator seeded with
    ``(seed, epoch)``. A loader that runs out starts over (a fresh pass: reshuffled by its own sampler).

    Args:
        loaders: member name → its training loader.
        weights: member name → sampling weight (≥ 0; a member with weight 0 gives no training batches).
        steps: batches per epoch.
        seed: order seed.
        prepare: member name → what each of its batches goes through (:class:`MemberLabels`); none by default.
    """

    def __init__(self, loaders: Mapping[str, DataLoader], weights: Mapping[str, float], steps: int, seed: int = 0,
                 prepare: Mapping[str, Callable[[Any], Any]] | None = None) -> None:
        self.loaders = dict(loaders)
        self.prepare = dict(prepare or {})
        self.names = [n for n in self.loaders if weights.get(n, 0.0) > 0]
        if not self.names:
            raise ValueError("no member has a positive training weight")
        self.weights = [float(weights[n]) for n in self.names]
        self.steps, self.seed, self.epoch = int(steps), int(seed), 0
        self.passes = {n: 0 for n in self.names}  # passes started per loader (a DistributedSampler's epoch)

    def __len__(self) -> int:
        return self.steps

    def counts(self) -> dict[str, int]:
        """Batches per member and epoch."""
        total = sum(self.weights)
        exact = [self.steps * w / total for w in self.weights]
        counts = [int(e) for e in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
        for i in by_remainder[: self.steps - sum(counts)]:
            counts[i] += 1
        return dict(zip(self.names, counts))

    def order(self, epoch: int) -> list[str]:
        """The members, batch by batch, of ``epoch``."""
        plan = [name for name, c in self.counts().items() for _ in range(c)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return [plan[i] for i in torch.randperm(len(plan), generator=g).tolist()]

    def __iter__(self) -> Iterator[dict]:
        order = self.order(self.epoch)
        self.epoch += 1
        running: dict[str, Iterator] = {}
        for name in order:
            it = running.get(name)
            if it is None:
                it = running[name] = self._start(name)
            try:
                batch = next(it)
            except StopIteration:
                it = running[name] = self._start(name)
                batch = next(it)
            prepare = self.prepare.get(name)
            yield prepare(batch) if prepare is not None else batch

    def _start(self, name: str) -> Iterator:
        """A fresh pass over loader ``name`` (a sharded one reshuffled for its pass number)."""
        loader = self.loaders[name]
        if isinstance(getattr(loader, "sampler", None), DistributedSampler):
            loader.sampler.set_epoch(self.passes[name])
        self.passes[name] += 1
        return iter(loader)


class MultiTaskDataModule(L.LightningDataModule):
    """Several named data modules trained as one (multi-dataset, multi-task).

    Args:
        datasets: member name → data module (``class_path``/``init_args`` in YAML); each keeps its own
            splits, transforms, image size and labels. Order = the order of the validation / test
            loaders (``dataloader_idx``).
        weights: member name → training sampling weight; a member left out gets 0 (validated and
            tested, never trained on). Default: each member's training batches per epoch (as if the
            datasets were concatenated).
        tasks: member name → the task its labels supervise (``grading``, ``localization``,
            ``grading/xray`` …): the heads its batches train (a named task's labels move under its
            batch keys, :class:`MemberLabels`) and the head checked against it; default: the member's
            ``task`` attribute, else ``grading``.
        prompts: member name → text prompt for every sample of the member (``{text}`` = the sample's
            own text), read by a model with a text encoder; a member left out keeps its samples' texts.
        batch_size: batch size of every member's loaders; None keeps each member's own.
        num_workers: loader workers of every member; None keeps each member's own.
        steps_per_epoch: training batches per epoch; default: the members' training batches summed.
        seed: seed of the member order.
        predict_member: the member ``predict`` runs on; default: every member, one loader each.
    """

    def __init__(
        self,
        datasets: dict[str, L.LightningDataModule],
        weights: dict[str, float] | None = None,
        tasks: dict[str, str] | None = None,
        prompts: dict[str, str] | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        steps_per_epoch: int | None = None,
        seed: int = 0,
        predict_member: str | None = None,
    ) -> None:
        super().__init__()
        if not datasets:
            raise ValueError("data.datasets is empty: name at least one data module")
        for label, given in (("weights", weights), ("tasks", tasks), ("prompts", prompts)):
            unknown = sorted(set(given or {}) - set(datasets))
            if unknown:
                raise ValueError(f"data.{label} names {unknown}, which are not in data.datasets {sorted(datasets)}")
        if any(w < 0 for w in (weights or {}).values()):
            raise ValueError(f"data.weights must be ≥ 0, got {weights}")
        if predict_member is not None and predict_member not in datasets:
            raise ValueError(f"data.predict_member {predict_member!r} is not in data.datasets {sorted(datasets)}")
        self.members = dict(datasets)
        for member in self.members.values():
            if batch_size is not None:
                member.batch_size = batch_size
            if num_workers is not None:
                member.num_workers = num_workers
        self.weights = None if weights is None else {n: float(weights.get(n, 0.0)) for n in self.members}
        self.member_tasks = {n: (tasks or {}).get(n) or getattr(m, "task", "grading") for n, m in self.members.items()}
        self.prompts = dict(prompts or {})
        self.member_labels: dict[str, MemberLabels] = {}
        for n, task in self.member_tasks.items():
            try:
                self.member_labels[n] = MemberLabels(task, self.prompts.get(n))
            except KeyError as exc:
                raise ValueError(f"data.tasks: member {n!r} names task {task!r}: {exc.args[0]}") from None
        self.steps_per_epoch, self.seed, self.predict_member = steps_per_epoch, seed, predict_member
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_batches: MemberBatches | None = None

    # -- what the model's tasks read ---------------------------------------------------------
    @property
    def source(self) -> str:
        return "multi-task data (" + ", ".join(f"{n}: {getattr(m, 'source', type(m).__name__)}" for n, m in self.members.items()) + ")"

    @property
    def image_size(self) -> int:
        """The first member's image size (the size a checkpoint records for deployment)."""
        return next(iter(self.members.values())).image_size

    @property
    def channels(self) -> int:
        return next(iter(self.members.values())).channels

    def task_data(self) -> list[tuple[str, L.LightningDataModule]]:
        """(task name, member) pairs: which data module feeds which task (the LightningModule
        lets each task check its head against its own member)."""
        return [(self.member_tasks[n], m) for n, m in self.members.items()]

    def for_task(self, task: str) -> L.LightningDataModule | None:
        """The member whose labels supervise ``task`` (the first one), None when none does."""
        return next((m for t, m in self.task_data() if t == task), None)

    # -- Lightning hooks ---------------------------------------------------------------------
    def prepare_data(self) -> None:
        for member in self.members.values():
            member.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for member in self.members.values():
            member.trainer = self.trainer
            member.setup(stage)

    def train_dataloader(self) -> MemberBatches:
        loaders = {n: m.train_dataloader() for n, m in self.members.items()}
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:  # DDP: each process trains on its share of every member
            loaders = {n: shard_loader(dl, trainer.global_rank, trainer.world_size, self.seed) for n, dl in loaders.items()}
        if self.weights is None:
            weights = {n: float(len(dl)) for n, dl in loaders.items()}
        else:
            weights = self.weights
            loaders = {n: dl for n, dl in loaders.items() if weights[n] > 0}
        steps = self.steps_per_epoch or sum(len(dl) for dl in loaders.values())
        self.train_batches = MemberBatches(loaders, weights, steps, self.seed, self.member_labels)
        return self.train_batches

    def eval_member(self, dataloader_idx: int) -> str:
        """The member behind validation / test / predict loader ``dataloader_idx``."""
        if self.predict_member is not None and self.trainer is not None and self.trainer.predicting:
            return self.predict_member
        return list(self.members)[dataloader_idx]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Validation, test and predict batches in their member's task vocabulary (training batches
        went through :class:`MemberLabels` in :class:`MemberBatches` already)."""
        if self.trainer is None or self.trainer.training:
            return batch
        return self.member_labels[self.eval_member(dataloader_idx)](batch)

    def val_dataloader(self) -> list[DataLoader]:
        return [m.val_dataloader() for m in self.members.values()]

    def test_dataloader(self) -> list[DataLoader]:
        return [m.test_dataloader() for m in self.members.values()]

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.predict_member is not None:
            return self.members[self.predict_member].predict_dataloader()
        return [m.predict_dataloader() for m in self.members.values()]

