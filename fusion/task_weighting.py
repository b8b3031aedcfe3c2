"""TaskWeighting: how the LightningModule sums the tasks' losses of a batch (``model.task_weighting``).

* ``sum``: ``L = Σ_t L_t`` (every task weight 1);
* ``fixed``: ``L = Σ_t w_t · L_t`` with ``w_t`` from ``task_weights`` (default 1);
* ``uncertainty``: homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018),
  ``L = Σ_t exp(−s_t) · L_t + max(s_t, clip)`` with one learnt log-variance ``s_t`` per task
  (initialised at 0, trained with the head parameters). The regulariser ``s_t`` goes negative once a
  task's loss falls below 1 and then rewards shrinking that task's variance without bound; it is
  clipped from below at ``clip`` (default 0), so the total stays ≥ 0 and a task's weight
  ``exp(−s_t)`` settles at ≤ ``exp(−clip)``.
* ``gradnorm``: GradNorm (Chen et al., ICML 2018), ``L = Σ_t w_t · L_t`` with weights learnt so that
  each task's weighted gradient norm on the *last shared layer* ``G_t = w_t ‖∇_W L_t‖`` tends to
  ``mean(G) · r̃_t^α``, where ``r̃_t`` is the task's loss ratio ``L_t / L_t(0)`` over its mean: a task
  that trains slower (higher ratio) gets a larger weight; ``α`` (``alpha``, default 1.5) sets how
  hard. ``W`` is the fusion transformer's last block (both heads read its tokens), else the image
  encoder's last stage (``shared_layer`` names another submodule of the model). The weights take one
  Adam step (``lr``) down the gradient of ``Σ_t |G_t − target_t|`` (targets held constant, as in the
  paper) after each training batch and are renormalised to sum to the task count.
* ``upgrad``: Jacobian descent (Quinton & Rey, 2024) with torchjd's ``UPGrad`` aggregator: the
  gradients of the tasks' losses on the shared parameters (everything but the task heads) are the
  rows of a Jacobian, each row is projected onto the dual cone of all rows (no task's loss goes up to
  first order) and the projections averaged. The heads get their own task's gradient. This needs
  manual optimisation: the LightningModule hands each training batch's losses to :meth:`manual_step`.

Batches of one data set. A multi-data-set module (``MultiTaskDataModule``) gives batches of one member
each, so a batch carries the labels of one task only, while GradNorm and UPGrad compare the tasks'
losses / gradients against each other:

* ``gradnorm`` keeps, per task, its latest gradient norm on ``W`` and its latest loss ratio (measured on
  the batches that label the task) and updates the weights from the latest value of every task seen
  so far; the weighted sum of a batch uses the weights as they stand (one extra backward from the
  batch's loss to ``W`` per labelled task);
* ``upgrad`` accumulates each task's shared-parameter gradient (its Jacobian row) over batches and
  takes one optimizer step once every task the data trains has contributed at least one batch since
  the last step (a combined step: one batch per task, as a loader that zips the members would give),
  or after ``max_accumulate`` batches. With two data sets that is one step per ≈ 2 batches, so UPGrad
  takes about half the optimizer steps of the other methods for the same batches.
  (torchjd's ``mtl_backward`` needs the tasks' losses on one graph, one batch; the rows here come
  from different batches, so they are aggregated directly with torchjd's ``UPGradWeighting``. Its
  dual-cone QP is solved by torchjd's quadprog projector when ``qpsolvers``/``quadprog`` are
  installed, else exactly by :class:`ActiveSetProjector`.) One process only: the per-task gradients
  come from ``torch.autograd.grad``, which DDP does not all-reduce. GradNorm's weights are updated
  per process from that process's batches.

Only the tasks a batch supervises enter its sum (the others add nothing, as without weighting); a task
whose labels the batch carries for none of its samples (``grade = -1`` throughout: a batch of another
data set) adds its zero loss but no log-variance term and no GradNorm / UPGrad record.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Literal

import torch
from torch import Tensor, nn

__all__ = ["METHODS", "ActiveSetProjector", "TaskWeighting", "shared_layer_parameters", "upgrad_aggregate"]

METHODS = ("sum", "fixed", "uncertainty", "gradnorm", "upgrad")
JD_EXTRA = "pip install 'lineside[adapt]'"


def shared_layer_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """GradNorm's ``W``: the parameters of the last layer every task reads.

    ``name``: a submodule path of ``model`` (``fusion.encoder.layers.1``); default the fusion
    transformer's last block, else the image encoder's last backbone stage with parameters."""
    if name:
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"gradnorm shared_layer {name!r} is not a submodule of the model: {err}") from None
    elif getattr(model, "fusion", None) is not None and hasattr(model.fusion, "encoder"):
        module = model.fusion.encoder.layers[-1]
    elif getattr(model, "image_encoder", None) is not None:
        stages = [m for m in model.image_encoder.backbone.children() if any(p.requires_grad for p in m.parameters())]
        if not stages:
            raise ValueError("gradnorm: the image encoder has no trainable stage to measure gradient norms on")
        module = stages[-1]
    else:
        raise ValueError("gradnorm: the model has neither a fusion transformer nor an image encoder; set shared_layer")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"gradnorm: the shared layer {name or type(module).__name__} has no trainable parameters")
    return params


def _dual_cone_weights(u: Tensor, gram: Tensor) -> Tensor:
    """argmin_v vᵀGv subject to v ≥ u, exactly, by trying every active set (few tasks: 2^m small
    linear solves). KKT: free coordinates solve (Gv)_F = 0, the bound ones sit at u with (Gv)_A ≥ 0."""
    m = u.numel()
    best, best_val = None, None
    for r in range(m + 1):
        for free in itertools.combinations(range(m), r):
            v = u.clone()
            bound = [i for i in range(m) if i not in free]
            if free:
                f = list(free)
                rhs = -gram[f][:, bound] @ u[bound] if bound else torch.zeros(len(f), dtype=u.dtype)
                try:
                    v[f] = torch.linalg.solve(gram[f][:, f], rhs)
                except RuntimeError:  # singular block: not this active set
                    continue
                if bool((v[f] < u[f] - 1e-9).any()):
                    continue
            if bound and bool(((gram @ v)[bound] < -1e-9).any()):
                continue
            val = float(v @ gram @ v)
            if best is None or val < best_val - 1e-12:
                best, best_val = v, val
    if best is None:
        raise ValueError("UPGrad: no feasible projection (the Gramian is not positive semi-definite)")
    return best


def _projector_base():
    try:
        from torchjd.linalg import DualConeProjector
    except ImportError as err:
        raise ImportError(f"task_weighting: upgrad needs torchjd: {JD_EXTRA}") from err
    return DualConeProjector


class ActiveSetProjector:
    """torchjd ``DualConeProjector`` solving the small dual-cone QP of UPGrad exactly in torch (no
    quadprog needed): Gramian normalised by its trace and regularised by ``reg_eps`` as torchjd's
    ``QuadprogProjector`` does. Built through :func:`make_projector` (torchjd is imported lazily)."""

    def __init__(self, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> None:
        self.norm_eps, self.reg_eps = norm_eps, reg_eps

    def __call__(self, U: Tensor, G: Tensor) -> Tensor:
        g = G.detach().double()
        trace = float(g.diagonal().sum())
        g = g / trace if trace > self.norm_eps else torch.zeros_like(g)
        g = g + self.reg_eps * torch.eye(g.shape[0], dtype=g.dtype)
        flat = U.detach().double().reshape(-1, U.shape[-1])
        out = torch.stack([_dual_cone_weights(u, g) for u in flat]).reshape(U.shape)
        return out.to(device=G.device, dtype=G.dtype)


def make_projector() -> object:
    """torchjd's quadprog projector when ``qpsolvers``/``quadprog`` are installed, else the exact
    active-set one (same QP)."""
    base = _projector_base()
    try:
        import qpsolvers  # noqa: F401
        import quadprog  # noqa: F401

        from torchjd.linalg import QuadprogProjector

        return QuadprogProjector()
    except ImportError:
        return type("ActiveSetDualConeProjector", (ActiveSetProjector, base), {})()


def upgrad_aggregate(jacobian: Tensor, projector: object | None = None) -> tuple[Tensor, Tensor]:
    """(m, n) Jacobian (one row per task) → (UPGrad update (n,), its per-row weights (m,)).
    The update is ``weightsᵀ J``: the mean of each row projected onto the dual cone of all rows."""
    try:
        from torchjd.aggregation import UPGradWeighting
    except ImportError as err:
        raise ImportError(f"task_weighting: upgrad needs torchjd: {JD_EXTRA}") from err
    weighting = UPGradWeighting(projector=projector or make_projector())
    j = jacobian.float()
    weights = weighting(j @ j.T)
    return weights @ j, weights


def _trained_tasks(module, task_names: list[str]) -> list[str]:
    """The tasks the trainer's data labels: a multi-task data module's members with a positive
    sampling weight, a single data module's task; all tasks without a trainer."""
    trainer = getattr(module, "_trainer", None)
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    if dm is None:
        return list(task_names)
    if callable(getattr(dm, "task_data", None)):
        weights = getattr(dm, "weights", None)
        names = list(getattr(dm, "members", {}) or {})
        pairs = dm.task_data()
        if weights is not None and len(names) == len(pairs):
            return [t for (t, _), n in zip(pairs, names) if weights.get(n, 0.0) > 0]
        return [t for t, _ in pairs]
    return [getattr(dm, "task", "grading")]


class TaskWeighting(nn.Module):
    """Per-task losses → the weighted total and the weights used.

    Args:
        task_names: every task of the model (names as ``InspectionModel.task_names``).
        method: ``sum``, ``fixed``, ``uncertainty``, ``gradnorm`` or ``upgrad`` (module docstring).
        weights: ``fixed``: task name → weight (tasks left out: 1).
        clip: ``uncertainty``: lower bound of the log-variance regulariser.
        alpha: ``gradnorm``: asymmetry α (0: equal gradient norms; larger: favour slow tasks more).
        lr: ``gradnorm``: Adam step size of the weights.
        shared_layer: ``gradnorm``: submodule path of ``W`` in the model (default: see
            :func:`shared_layer_parameters`).
        max_accumulate: ``upgrad``: at most this many batches per optimizer step.
    """

    def __init__(self, task_names: list[str], method: Literal["sum", "fixed", "uncertainty", "gradnorm", "upgrad"] = "sum",
                 weights: dict[str, float] | None = None, clip: float = 0.0, alpha: float = 1.5, lr: float = 0.025,
                 shared_layer: str | None = None, max_accumulate: int = 8) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"task_weighting must be one of {METHODS}, got {method!r}")
        unknown = sorted(set(weights or {}) - set(task_names))
        if unknown:
            raise ValueError(f"task_weights names {unknown}, which are not tasks of the model {list(task_names)}")
        if weights and method != "fixed":
            raise ValueError(f"task_weights are for task_weighting: fixed, not {method!r}")
        if alpha < 0 or lr <= 0 or max_accumulate < 1:
            raise ValueError(f"task weighting options: alpha ≥ 0, lr > 0, max_accumulate ≥ 1; got {alpha}, {lr}, {max_accumulate}")
        self.method, self.clip = method, float(clip)
        self.task_names = list(task_names)
        self.fixed = {t: float((weights or {}).get(t, 1.0)) for t in self.task_names}
        self.alpha, self.lr, self.shared_layer, self.max_accumulate = float(alpha), float(lr), shared_layer, int(max_accumulate)
        if method == "uncertainty":
            self.log_vars = nn.ParameterDict({self._key(t): nn.Parameter(torch.zeros(())) for t in self.task_names})
        n = len(self.task_names)
        if method == "gradnorm":  # buffers: saved with the checkpoint, moved with the module
            self.register_buffer("gn_weights", torch.ones(n))
            for name in ("gn_initial", "gn_norm", "gn_ratio"):
                self.register_buffer(name, torch.full((n,), float("nan")))
            for name in ("gn_m", "gn_v"):
                self.register_buffer(name, torch.zeros(n))
            self.register_buffer("gn_steps", torch.zeros((), dtype=torch.long))
        if method == "upgrad":
            self.register_buffer("jd_weights", torch.ones(n))
        self._shared: Callable[[], list[nn.Parameter]] | None = None
        self._rows: dict[str, list[Tensor]] = {}
        self._accumulated = 0
        self._expected: set[str] | None = None
        self._projector = None

    @staticmethod
    def _key(task: str) -> str:
        return task.replace("/", "__")  # ParameterDict keys may not hold dots; slashes kept readable

    # -- the model's parameters ------------------------------------------------------------------
    def bind(self, model: nn.Module) -> None:
        """Where GradNorm measures gradient norms / which parameters UPGrad treats as shared (looked
        up on each use, never registered here: the model owns them)."""
        if self.method == "gradnorm":
            shared_layer_parameters(model, self.shared_layer)  # fail at construction, not mid-training
            self._shared = lambda: shared_layer_parameters(model, self.shared_layer)
        elif self.method == "upgrad":
            def shared() -> list[nn.Parameter]:
                heads = {id(p) for t in model.tasks for p in t.head.parameters()}
                return [p for p in model.parameters() if p.requires_grad and id(p) not in heads]

            self._shared = shared

    def weights(self) -> dict[str, Tensor]:
        """The current weight of every task (detached; ``upgrad``: the weights of its last step's
        rows, 1 before the first)."""
        if self.method == "uncertainty":
            return {t: torch.exp(-self.log_vars[self._key(t)].detach()) for t in self.task_names}
        if self.method == "gradnorm":
            return {t: self.gn_weights[i].detach().clone() for i, t in enumerate(self.task_names)}
        if self.method == "upgrad":
            return {t: self.jd_weights[i].detach().clone() for i, t in enumerate(self.task_names)}
        return {t: torch.tensor(self.fixed[t] if self.method == "fixed" else 1.0) for t in self.task_names}

    def forward(self, parts: dict[str, Tensor], labelled: set[str] | None = None) -> Tensor:
        """``parts``: task name → its loss on this batch (only the tasks the batch supervises);
        ``labelled``: those of them with a labelled sample (default all). A task without one adds its
        (zero) loss but, under ``uncertainty``, no log-variance term, which would otherwise pull its
        weight up on every batch of the other data sets. ``gradnorm`` in training mode (with grad
        enabled and :meth:`bind` called) also records the labelled tasks' gradient norms and loss
        ratios and updates the weights (they apply from the next batch on)."""
        if self.method in ("sum", "upgrad"):  # upgrad: this sum is logged; manual_step aggregates
            return sum(parts.values())
        if self.method == "fixed":
            return sum(self.fixed[t] * v for t, v in parts.items())
        if self.method == "gradnorm":
            w = self.gn_weights.detach().clone()
            total = sum(w[self.task_names.index(t)] * v for t, v in parts.items())
            if self.training and torch.is_grad_enabled() and self._shared is not None:
                self._gradnorm_record(parts, parts.keys() if labelled is None else labelled)
                self._gradnorm_update()
            return total
        total = 0.0
        for t, v in parts.items():
            s = self.log_vars[self._key(t)]
            total = total + torch.exp(-s) * v
            if labelled is None or t in labelled:
                total = total + s.clamp_min(self.clip)
        return total

    # -- GradNorm --------------------------------------------------------------------------------
    def _gradnorm_record(self, parts: dict[str, Tensor], labelled: Iterable[str]) -> None:
        shared = self._shared()
        for t in labelled:
            loss = parts[t]
            if not loss.requires_grad:
                continue
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum(g.detach().float().pow(2).sum() for g in grads if g is not None) + 0.0)
            i = self.task_names.index(t)
            value = float(loss.detach())
            if not torch.isfinite(self.gn_initial[i]):
                self.gn_initial[i] = max(value, 1e-8)
            self.gn_norm[i] = float(norm)
            self.gn_ratio[i] = value / float(self.gn_initial[i])

    def gradnorm_targets(self) -> tuple[Tensor, Tensor, Tensor]:
        """(seen mask, weighted norms G_t, targets mean(G)·r̃_t^α) over the tasks recorded so far."""
        seen = torch.isfinite(self.gn_norm) & torch.isfinite(self.gn_ratio)
        g = self.gn_weights * torch.nan_to_num(self.gn_norm)
        ratio = torch.nan_to_num(self.gn_ratio, nan=1.0)
        rel = ratio / ratio[seen].mean().clamp_min(1e-12) if bool(seen.any()) else ratio
        target = (g[seen].mean() if bool(seen.any()) else g.new_zeros(())) * rel.pow(self.alpha)
        return seen, g, target

    @torch.no_grad()
    def _gradnorm_update(self) -> None:
        seen, g, target = self.gradnorm_targets()
        if int(seen.sum()) < 2:
            return
        grad = torch.where(seen, torch.sign(g - target) * torch.nan_to_num(self.gn_norm), torch.zeros_like(g))
        self.gn_steps += 1
        b1, b2, step = 0.9, 0.999, int(self.gn_steps)
        self.gn_m.mul_(b1).add_((1 - b1) * grad)
        self.gn_v.mul_(b2).add_((1 - b2) * grad * grad)
        m_hat, v_hat = self.gn_m / (1 - b1**step), self.gn_v / (1 - b2**step)
        w = self.gn_weights - torch.where(seen, self.lr * m_hat / (v_hat.sqrt() + 1e-8), torch.zeros_like(g))
        w = w.clamp_min(1e-3)
        w[seen] = w[seen] * (float(seen.sum()) / w[seen].sum())  # the seen tasks' weights sum to their count
        self.gn_weights.copy_(w)

    # -- UPGrad: manual optimisation -------------------------------------------------------------
    def expect_tasks(self, tasks: Iterable[str]) -> None:
        """``upgrad``: the tasks the training data labels (one step waits for a batch of each)."""
        self._expected = set(tasks) & set(self.task_names)

    def manual_step(self, module, losses: dict[str, Tensor]) -> None:
        """``upgrad``: one training batch's ``loss_<task>`` terms → gradients (heads: plain backward;
        shared parameters: one Jacobian row per task, accumulated); steps the optimizer with the
        UPGrad aggregate once every expected task has a row (or after ``max_accumulate`` batches),
        and the LR scheduler at each epoch's end."""
        if self._shared is None:
            raise RuntimeError("TaskWeighting.manual_step: bind(model) first")
        if getattr(module, "loss_hooks", None):  # their extra terms live only in losses["loss"]
            raise RuntimeError("task_weighting: upgrad aggregates the tasks' own losses and would drop the terms of "
                               "distillation / continual-learning loss hooks; use another task_weighting with them")
        trainer = getattr(module, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:  # autograd.grad bypasses DDP's gradient all-reduce
            raise RuntimeError("task_weighting: upgrad trains on one process only (its per-task gradients are not "
                               "all-reduced across DDP ranks); use sum / fixed / uncertainty / gradnorm with devices > 1")
        parts = {t: losses[f"loss_{t}"] for t in self.task_names if f"loss_{t}" in losses and losses[f"loss_{t}"].requires_grad}
        shared = self._shared()
        shared_ids = {id(p) for p in shared}
        others = [p for p in module.parameters() if p.requires_grad and id(p) not in shared_ids]
        for k, (t, loss) in enumerate(parts.items()):
            grads = torch.autograd.grad(loss, shared + others, retain_graph=k < len(parts) - 1, allow_unused=True)
            row = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(shared, grads[: len(shared)])]
            if t in self._rows:
                row = [a + b for a, b in zip(self._rows[t], row)]
            self._rows[t] = row
            for p, g in zip(others, grads[len(shared):]):
                if g is not None:
                    p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()
        self._accumulated += 1
        if self._expected is None:
            self.expect_tasks(_trained_tasks(module, self.task_names))
        expected = self._expected or set(self.task_names)
        ready = self._rows and (expected <= set(self._rows) or self._accumulated >= self.max_accumulate)
        last = bool(trainer is not None and trainer.is_last_batch)
        if ready or (last and self._rows):
            self._upgrad_apply(shared)
            opt = module.optimizers()
            opt.step()
            opt.zero_grad()
        if last:
            sched = module.lr_schedulers()
            if sched is not None:
                sched.step()

    @torch.no_grad()
    def _upgrad_apply(self, shared: list[nn.Parameter]) -> None:
        names = list(self._rows)
        jac = torch.stack([torch.cat([g.flatten().float() for g in self._rows[t]]) for t in names])
        if self._projector is None:
            self._projector = make_projector()
        update, w = upgrad_aggregate(jac, self._projector)
        offset = 0
        for p in shared:
            n = p.numel()
            p.grad = update[offset: offset + n].view_as(p).to(p.dtype)
            offset += n
        for t, wt in zip(names, w):
            self.jd_weights[self.task_names.index(t)] = float(wt)
        self._rows, self._accumulated = {}, 0
