"""lineside.pointcloud: the 3-D side: open3d IO and preprocessing (:mod:`.io`, :mod:`.preprocess`),
procedural parts and virtual depth views (:mod:`.parts`), antipodal grasp labels and the analytic
grasp check (:mod:`.grasp_labels`), and the exportable point encoder (:mod:`.point_encoder`).

Names are imported lazily (PEP 562), so ``lineside.pointcloud.point_encoder`` (pure torch) loads
on a GPU station without open3d. This package never imports ``fusion``, ``export`` or ``vision``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "io": ["CameraIntrinsics", "PointCloud", "PointCloudReadError", "depth_to_point_cloud", "read_depth_image",
           "read_intrinsics", "read_point_cloud", "read_rgbd"],
    "preprocess": ["NormalizeTransform", "PreprocessedCloud", "crop_to_box", "estimate_normals", "normalize",
                   "preprocess_cloud", "remove_statistical_outliers", "sample_fixed", "voxel_downsample"],
    "grasp_labels": ["GRASP_DIM", "GraspScene", "ParallelJawGripper", "antipodal_grasps", "evaluate_grasps",
                     "grasp_frames", "is_grasp_successful", "make_grasps"],
    "parts": ["PART_KINDS", "Part", "PartialView", "extrude_polygon", "holed_plate", "look_at", "make_part",
              "random_part", "render_partial_view", "revolve_profile"],
    "point_encoder": ["PlainPointNet", "PointEncoder"],
    "grasp_dataset": ["GraspViewConfig", "PartGraspDataset", "WorkshopToolsDataset"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
