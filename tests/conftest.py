"""Shared fixtures: tiny synthetic image trees, the tiny training config, the shared real data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_image(path: Path, size=(48, 40), mode="L", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """root/{train,val,test}/{ok,crack}/*.png with mixed sizes and grayscale/RGB files."""
    root = tmp_path / "cells"
    n = 0
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        for cls in ("ok", "crack"):
            for i in range(count):
                mode = "RGB" if i % 3 == 0 else "L"
                write_image(root / split / cls / f"{cls}_{i}.png", size=(40 + 8 * (i % 3), 36 + 4 * i), mode=mode, seed=n)
                n += 1
    return root


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """configs/tiny.yaml with its run folder (trainer.default_root_dir: checkpoints, logs,
    config.yaml) moved to tmp_path/run."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    out = tmp_path / "tiny.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the repo as ../shared)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _lineside_cache(tmp_path_factory):
    """Checkpoints exported on the fly (``lineside score``'s ONNX cache) go to a session folder."""
    os.environ["LINESIDE_CACHE"] = str(tmp_path_factory.mktemp("lineside_cache"))
    yield
