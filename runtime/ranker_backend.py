"""A grasp ranker file (:meth:`lineside.fusion.grasp_ranker.GraspRanker.save`) as a point-model backend.

    lineside score --model runs/grasp_ranker/ranker_procedural.pt --input scans/ --output grasps.csv

:func:`lineside.runtime.open_model.open_model` recognises a ranker file by its content
(:func:`~lineside.fusion.grasp_ranker.is_ranker_file`), whatever its suffix, and returns a
:class:`RankerBackend`. It takes the inputs of a grasp network (``points``, ``point_mask``,
``point_normals``, prepared by :mod:`lineside.export.point_inputs` with the grasp views' defaults:
1024 points, 2 mm voxels, 1 cm normal radius, sensor metres) and gives the same outputs
(``grasp_position`` … ``grasp_score``, ``K`` = :data:`TOP_K` grasps per cloud, best first, unused picks
score 0), so ``score`` writes the same ``grasps`` column and ``station`` the same records as for a network.
Each cloud runs :meth:`~lineside.fusion.grasp_ranker.GraspRanker.suggest` on its real points: candidates
from the cloud, ranked by the ranker's strict success probability (the ``score``), 1 cm NMS.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

import numpy as np

from lineside.runtime.backend import Backend, BackendError

__all__ = ["RankerBackend", "TOP_K"]

log = logging.getLogger("lineside.runtime")

TOP_K = 5  # grasps per cloud, as GraspRanker.suggest's default


class RankerBackend(Backend):
    """Run a grasp ranker file on prepared clouds (see the module docstring).

    Args:
        path: the ranker file. device: the ranker runs on the CPU whatever is asked (a few-kB MLP;
            candidate generation is NumPy/SciPy). num_points: P of the prepared clouds. k: grasps per cloud.
    """

    name = "ranker"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", num_points: int = 1024, k: int = TOP_K) -> None:
        super().__init__(path, device)
        if not str(device).startswith("cpu"):
            log.warning("%s: a grasp ranker runs on the CPU (device %r asked)", path, device)
        from lineside.fusion.grasp_ranker import GraspRanker

        try:
            self.ranker = GraspRanker.load(path)
        except (ValueError, FileNotFoundError) as exc:
            raise BackendError(str(exc)) from exc
        self.k = int(k)
        p = int(num_points)
        self.metadata = {
            "format": "grasp-ranker",
            "artefact": os.path.basename(self.path),
            "inputs": [
                {"name": "points", "dtype": "float32", "shape": [1, p, 3]},
                {"name": "point_mask", "dtype": "bool", "shape": [1, p]},
                {"name": "point_normals", "dtype": "float32", "shape": [1, p, 3]},
            ],
            "outputs": [
                {"name": "grasp_position", "dtype": "float32", "shape": [1, self.k, 3]},
                {"name": "grasp_approach", "dtype": "float32", "shape": [1, self.k, 3]},
                {"name": "grasp_closing", "dtype": "float32", "shape": [1, self.k, 3]},
                {"name": "grasp_width", "dtype": "float32", "shape": [1, self.k]},
                {"name": "grasp_score", "dtype": "float32", "shape": [1, self.k]},
            ],
            "points": {"num_points": p, "features": "normals"},  # the grasp views' preprocessing defaults otherwise
            "gripper": asdict(self.ranker.gripper),
        }

    def _run_named(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pts, mask, nrm = inputs["points"], inputs["point_mask"].astype(bool), inputs["point_normals"]
        n = len(pts)
        out = {"grasp_position": np.zeros((n, self.k, 3), np.float32), "grasp_approach": np.zeros((n, self.k, 3), np.float32),
               "grasp_closing": np.zeros((n, self.k, 3), np.float32), "grasp_width": np.zeros((n, self.k), np.float32),
               "grasp_score": np.zeros((n, self.k), np.float32)}
        for i in range(n):
            g = self.ranker.suggest(pts[i][mask[i]], nrm[i][mask[i]], k=self.k)  # (k', 11), best first
            m = len(g)
            out["grasp_position"][i, :m], out["grasp_approach"][i, :m] = g[:, 0:3], g[:, 3:6]
            out["grasp_closing"][i, :m], out["grasp_width"][i, :m] = g[:, 6:9], g[:, 9]
            out["grasp_score"][i, :m] = np.maximum(g[:, 10], np.finfo(np.float32).tiny)  # a real pick never reads as unused
        return out

    def describe(self) -> str:
        return f"grasp ranker ({os.path.basename(self.path)})"
