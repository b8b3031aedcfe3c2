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


TRAINED_ELPV_EPOCHS, TRAINED_ELPV_BATCHES = 3, 80  # 240 optimizer steps


@pytest.fixture(scope="session")
def trained_elpv_ckpt(tmp_path_factory) -> Path:
    """A small grading model trained on the built-in ELPV cells for a few hundred optimizer steps
    (once per test session): configs/quickstart.yaml with ImageNet EfficientNet-Lite0 (first 3
    levels frozen), a 64-wide one-layer fusion, 80-px cells, light augmentation, batch 16, fp32,
    ``TRAINED_ELPV_EPOCHS`` × ``TRAINED_ELPV_BATCHES`` steps on one torch thread (the quickest on a
    shared 2-core machine: about 50 s of CPU time). Its weights and activations are a trained
    network's (train loss falls from about 2.4 to 1.4), which a tiny random model's are not: what
    reduced-precision parity and scoring tests need. Validation accuracy stays modest at this size.
    Returns ``checkpoints/last.ckpt`` (the weights after the last step); the run folder (the
    resolved ``config.yaml``, ``logs/``) is its grandparent."""
    import torch

    from lineside.fusion.training_cli import main as train_main

    tmp = tmp_path_factory.mktemp("trained_elpv")
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    enc = cfg["model"]["model"]["init_args"]
    enc["image_encoder"]["init_args"].update(embed_dim=64, frozen_levels=3)
    enc["fusion"]["init_args"].update(embed_dim=64, depth=1, num_heads=2, dropout=0.0)
    enc["grading_head"]["init_args"].update(embed_dim=64)
    cfg["model"]["scheduler"]["init_args"]["T_max"] = TRAINED_ELPV_EPOCHS
    cfg["trainer"].update(
        accelerator="cpu", precision="32-true", max_epochs=TRAINED_ELPV_EPOCHS, limit_train_batches=TRAINED_ELPV_BATCHES,
        limit_val_batches=4, num_sanity_val_steps=0, log_every_n_steps=50, enable_model_summary=False,
        enable_progress_bar=False, default_root_dir=str(tmp),
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp), "name": "logs"}},
    )
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    # the weights after the last step (``last.ckpt``), whether or not validation improved
    cfg["trainer"]["callbacks"][0]["init_args"] = {"dirpath": str(tmp / "checkpoints"), "filename": "last", "monitor": None,
                                                   "save_top_k": 1, "enable_version_counter": False}
    cfg["data"].update(image_size=80, batch_size=16, num_workers=0, augment="light")
    path = tmp / "trained_elpv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_main(["fit", "--config", str(path)])
    finally:
        torch.set_num_threads(threads)
    ckpt = tmp / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), f"training wrote no {ckpt}"
    return ckpt
