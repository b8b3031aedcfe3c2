"""TaskWeighting: how the LightningModule sums the tasks' losses of a batch (``model.task_weighting``).

* ``sum``: ``L = Σ_t L_t`` (every task weight 1);
* ``fixed``: ``L = Σ_t w_t · L_t`` with ``w_t`` from ``task_weights`` (default 1);
* ``uncertainty``: homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018),
  ``L = Σ_t exp(−s_t) · L_t + max(s_t, clip)`` with one learnt log-variance ``s_t`` per task
  (initialised at 0, trained with the head parameters). The regulariser ``s_t`` goes negative once a
  task's loss falls below 1 and then rewards shrinking that task's variance without bound; it is
  clipped from below at ``clip`` (default 0), so the total stays ≥ 0 and a task's weight
  ``exp(−s_t)`` settles at ≤ ``exp(−clip)``.

Only the tasks a batch supervises enter its sum (the others add nothing, as without weighting); a task
whose labels the batch carries for none of its samples (``grade = -1`` throughout: a batch of another
data set) adds its zero loss but no log-variance term.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["TaskWeighting"]

METHODS = ("sum", "fixed", "uncertainty")


class TaskWeighting(nn.Module):
    """Per-task losses → the weighted total and the weights used.

    Args:
        task_names: every task of the model (names as ``InspectionModel.task_names``).
        method: ``sum``, ``fixed`` or ``uncertainty`` (module docstring).
        weights: ``fixed``: task name → weight (tasks left out: 1).
        clip: ``uncertainty``: lower bound of the log-variance regulariser.
    """

    def __init__(self, task_names: list[str], method: Literal["sum", "fixed", "uncertainty"] = "sum",
                 weights: dict[str, float] | None = None, clip: float = 0.0) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"task_weighting must be one of {METHODS}, got {method!r}")
        unknown = sorted(set(weights or {}) - set(task_names))
        if unknown:
            raise ValueError(f"task_weights names {unknown}, which are not tasks of the model {list(task_names)}")
        if weights and method != "fixed":
            raise ValueError(f"task_weights are for task_weighting: fixed, not {method!r}")
        self.method, self.clip = method, float(clip)
        self.task_names = list(task_names)
        self.fixed = {t: float((weights or {}).get(t, 1.0)) for t in self.task_names}
        if method == "uncertainty":
            self.log_vars = nn.ParameterDict({self._key(t): nn.Parameter(torch.zeros(())) for t in self.task_names})

    @staticmethod
    def _key(task: str) -> str:
        return task.replace("/", "__")  # ParameterDict keys may not hold dots; slashes kept readable

    def weights(self) -> dict[str, Tensor]:
        """The current weight of every task (detached)."""
        if self.method == "uncertainty":
            return {t: torch.exp(-self.log_vars[self._key(t)].detach()) for t in self.task_names}
        return {t: torch.tensor(self.fixed[t] if self.method == "fixed" else 1.0) for t in self.task_names}

    def forward(self, parts: dict[str, Tensor], labelled: set[str] | None = None) -> Tensor:
        """``parts``: task name → its loss on this batch (only the tasks the batch supervises);
        ``labelled``: those of them with a labelled sample (default all). A task without one adds its
        (zero) loss but, under ``uncertainty``, no log-variance term, which would otherwise pull its
        weight up on every batch of the other data sets."""
        if self.method == "sum":
            return sum(parts.values())
        if self.method == "fixed":
            return sum(self.fixed[t] * v for t, v in parts.items())
        total = 0.0
        for t, v in parts.items():
            s = self.log_vars[self._key(t)]
            total = total + torch.exp(-s) * v
            if labelled is None or t in labelled:
                total = total + s.clamp_min(self.clip)
        return total
