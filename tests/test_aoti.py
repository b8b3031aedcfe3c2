"""AOTInductor export: the tiny checkpoint compiled once (about 20-40 s on 2 cores), then loaded and checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lineside.runtime import BackendError, TorchBackend, load_backend
from lineside.export.metadata import read_metadata
from lineside.export.parity import check_parity

CKPT = Path(__file__).parent / "data" / "pre_namespace_tiny.ckpt"


@pytest.fixture(scope="module")
def aoti_export(tmp_path_factory):
    from lineside.export.aoti import export_aoti
    from lineside.runtime.verify import verify_artefact

    out = tmp_path_factory.mktemp("aoti")
    return export_aoti(CKPT, out, batch_sizes=(1, 4), parity_images=6, verify=verify_artefact)


@pytest.fixture(scope="module")
def reference():
    return TorchBackend(CKPT)


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 64, 64), dtype=np.uint8)


def test_package_builds_and_parity_passes(aoti_export):
    r = aoti_export
    assert r.path.name == "model.pt2" and r.path.is_file()
    assert (r.path.parent / "metadata.json").is_file()
    assert r.parity is not None and r.parity.ok, r.parity.table()
    assert {row.output for row in r.parity.rows} == {"grade_probs", "grade", "grade_heatmap"}


def test_metadata_round_trip(aoti_export):
    meta = read_metadata(aoti_export.path)
    assert meta["format"] == "aoti" and meta["artefact"] == "model.pt2"
    assert meta["inputs"][0]["name"] == "image" and meta["inputs"][0]["dtype"] == "uint8"
    assert meta["inputs"][0]["shape"] == ["N", 1, 64, 64]
    assert [o["name"] for o in meta["outputs"]] == ["grade_probs", "grade", "grade_heatmap"]
    assert meta["aoti"]["device"] == "cpu" and meta["aoti"]["max_batch"] == 4
    assert meta["batch_sizes"] == [1, 4] and meta["max_batch_enforced"] is True
    assert meta["parity"]["ok"] is True
    assert len(meta["class_names"]) == 4


def test_loads_by_suffix_and_folder_and_matches_eager(aoti_export, reference):
    backend = load_backend(aoti_export.path)
    assert backend.name == "aoti" and load_backend(aoti_export.path.parent).name == "aoti"
    assert backend.input_size == (64, 64) and backend.channels == 1 and len(backend.class_names) == 4
    report = check_parity(reference, backend, _frames(10), "fp32", batch_size=3)
    assert report.ok, report.table()


def test_dynamic_batch(aoti_export, reference):
    backend = load_backend(aoti_export.path)
    for n in (1, 3, 9):  # 9 > max batch 4: split into 4 + 4 + 1 by the backend
        x = _frames(n, seed=n)
        out, ref = backend(x), reference(x)
        assert out["grade_probs"].shape == (n, 4) and out["grade_probs"].dtype == np.float32
        assert out["grade"].shape == (n,) and out["grade"].dtype == np.int64
        np.testing.assert_allclose(out["grade_probs"], ref["grade_probs"], atol=1e-4)
        np.testing.assert_array_equal(out["grade"], ref["grade"])


def test_embedded_metadata_when_json_is_missing(aoti_export, tmp_path):
    lone = tmp_path / "station.pt2"
    lone.write_bytes(aoti_export.path.read_bytes())
    backend = load_backend(lone)
    assert backend.output_names == ["grade_probs", "grade", "grade_heatmap"] and backend.metadata["format"] == "aoti"
    assert backend(_frames(2))["grade_probs"].shape == (2, 4)


def test_wrong_device_is_refused(aoti_export):
    with pytest.raises(BackendError, match="compiled for cpu"):
        load_backend(aoti_export.path, device="cuda")


def test_runs_without_training_code(aoti_export):
    """A station process: the package runs with neither Lightning nor the model classes imported."""
    code = (
        "import sys, numpy as np\n"
        "from lineside.runtime import load_backend\n"
        f"b = load_backend({str(aoti_export.path)!r})\n"
        "out = b(np.zeros((2, 1, 64, 64), np.uint8))\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'timm', 'lineside.fusion.model', 'lineside.fusion.lightning_module', 'lineside.vision.image_encoder') if m in sys.modules]\n"
        "print(out['grade_probs'].shape, bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(2, 4) []" in proc.stdout


def test_cli_rejects_unknown_device(tmp_path, capsys):
    from lineside.cli.export import aoti_main as main

    assert main(["--ckpt", str(CKPT), "--out", str(tmp_path), "--device", "tpu", "--parity-images", "0"]) == 1
    assert "cpu or cuda" in capsys.readouterr().err
