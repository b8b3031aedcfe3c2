"""lineside.pointcloud: the 3-D side (open3d IO and preprocessing, point encoder, grasp geometry).

Not built yet: grasp-point suggestion is planned after the image grading foundation is
measured on real data. This package never imports ``fusion``, ``export`` or ``vision``.
"""

__all__: list[str] = []

from .io import CameraIntrinsics, PointCloud, PointCloudReadError, depth_to_point_cloud, read_depth_image, read_intrinsics, read_point_cloud, read_rgbd  # noqa: E402

__all__ += ["CameraIntrinsics", "PointCloud", "PointCloudReadError", "depth_to_point_cloud", "read_depth_image", "read_intrinsics", "read_point_cloud", "read_rgbd"]

from .preprocess import NormalizeTransform, PreprocessedCloud, crop_to_box, estimate_normals, normalize, preprocess_cloud, remove_statistical_outliers, sample_fixed, voxel_downsample  # noqa: E402

__all__ += ["NormalizeTransform", "PreprocessedCloud", "crop_to_box", "estimate_normals", "normalize", "preprocess_cloud", "remove_statistical_outliers", "sample_fixed", "voxel_downsample"]

from .grasp_labels import GRASP_DIM, GraspScene, ParallelJawGripper, antipodal_grasps, evaluate_grasps, grasp_frames, is_grasp_successful, make_grasps  # noqa: E402

__all__ += ["GRASP_DIM", "GraspScene", "ParallelJawGripper", "antipodal_grasps", "evaluate_grasps", "grasp_frames", "is_grasp_successful", "make_grasps"]

from .parts import PART_KINDS, Part, PartialView, extrude_polygon, holed_plate, look_at, make_part, random_part, render_partial_view, revolve_profile  # noqa: E402

__all__ += ["PART_KINDS", "Part", "PartialView", "extrude_polygon", "holed_plate", "look_at", "make_part", "random_part", "render_partial_view", "revolve_profile"]
