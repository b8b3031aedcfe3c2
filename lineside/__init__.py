"""lineside: multimodal quality inspection for production lines.

One import name for the repository's folders: ``lineside.vision``, ``lineside.pointcloud``,
``lineside.fusion`` and ``lineside.export`` (installed with setuptools ``package-dir``
mappings, so the repository keeps its top-level layout). One command, ``lineside``
(:mod:`lineside.cli`), carries the subcommands ``fit|validate|test|predict``, ``crossval``,
``score``, ``export``, ``station`` and ``bench``.
"""

from __future__ import annotations

import os as _os

__version__ = "0.2.0"

# Run from a checkout without installing (``python train.py …``): the subpackages are the
# repository's top-level folders beside this one.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and _os.path.isdir(_os.path.join(_checkout, "fusion")):
    if _checkout not in __path__:
        __path__.append(_checkout)

__all__ = ["__version__"]
