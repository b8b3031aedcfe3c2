"""lineside.vision: the image side of lineside.

Image IO with clear errors, albumentations pipelines for inspection images, datasets
(built-in ELPV electroluminescence cells, ImageFolder trees, CSV manifests), split
helpers, the timm-based :class:`ImageEncoder` and :class:`PatchMemory` (anomaly scores and
heatmaps from good images only).

This package never imports ``fusion``, ``export`` or ``pointcloud``.
"""

from lineside.vision.image_encoder import EncoderOutput, ImageEncoder
from lineside.vision.io import ImageReadError, read_image
from lineside.vision.patch_memory import AnomalyOutput, PatchMemory, PatchMemoryError

__all__ = ["AnomalyOutput", "EncoderOutput", "ImageEncoder", "ImageReadError", "PatchMemory", "PatchMemoryError", "read_image"]
