"""GradePredictionWriter: ``lineside predict`` writes one CSV row per image as batches finish."""

from __future__ import annotations

import csv
import os

from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["GradePredictionWriter"]


class GradePredictionWriter(BasePredictionWriter):
    """Appends ``path, grade, grade_name, confidence, p_<grade>…`` rows to ``output``.

    Args:
        output: CSV path; default ``<log_dir>/predictions.csv``, i.e. ``<run>/logs/version_N/predictions.csv``
            beside the run of ``--ckpt_path <run>/checkpoints/X.ckpt``.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self._path: str | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self._path = self.output or os.path.join(trainer.log_dir or ".", "predictions.csv")
        os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
        names = pl_module.class_names
        with open(self._path, "w", newline="") as fh:
            csv.writer(fh).writerow(["path", "grade", "grade_name", "confidence", *[f"p_{n}" for n in names]])

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        names = pl_module.class_names
        with open(self._path, "a", newline="") as fh:
            w = csv.writer(fh)
            for path, g, c, p in zip(prediction["path"], prediction["grade"].tolist(), prediction["confidence"].tolist(), prediction["probs"].tolist()):
                w.writerow([path, g, names[g], f"{c:.6f}", *[f"{v:.6f}" for v in p]])

    def on_predict_end(self, trainer, pl_module) -> None:
        print(f"predictions written to {self._path}")
