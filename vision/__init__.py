"""lineside.vision: the image side of lineside.

Image IO with clear errors, albumentations pipelines for inspection images, datasets
(built-in ELPV electroluminescence cells, ImageFolder trees, CSV manifests), split
helpers and the timm-based :class:`ImageEncoder`.

This package never imports ``fusion``, ``export`` or ``pointcloud``.
"""

from vision.image_encoder import EncoderOutput, ImageEncoder
from vision.io import ImageReadError, read_image

__all__ = ["EncoderOutput", "ImageEncoder", "ImageReadError", "read_image"]
