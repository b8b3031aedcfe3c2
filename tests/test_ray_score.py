"""``lineside score --engine ray``: a real local Ray cluster scores real ELPV cells and corrupt files with the rows
of the single-process scorer (same columns, same values, same order), and a re-run skips the rows already written."""

from __future__ import annotations

import csv
import shutil
import tempfile

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
ray = pytest.importorskip("ray", reason="Ray Data scoring needs ray: pip install 'lineside[plant]'")

from lineside.export.checkpoint import LoadedModel  # noqa: E402
from lineside.fusion.fusion_transformer import FusionTransformer  # noqa: E402
from lineside.fusion.grading_head import GradingHead  # noqa: E402
from lineside.fusion.localization_head import LocalizationHead  # noqa: E402
from lineside.fusion.model import InspectionModel  # noqa: E402
from lineside.runtime.ray_score import score_on_ray  # noqa: E402
from lineside.runtime.score import score  # noqa: E402
from lineside.vision.image_encoder import ImageEncoder  # noqa: E402

N_CELLS = 10


def tiny_onnx(out_dir) -> str:
    """A grading + localization model (64 px, grayscale) exported to ONNX: grade columns and a boxes column."""
    from lineside.export.onnx_export import export_onnx

    torch.manual_seed(0)
    encoder = ImageEncoder(backbone="test_efficientnet", pretrained=False, feature_levels=[-2, -1], embed_dim=32, in_chans=1)
    head = LocalizationHead(32, 2, level_index=0, num_convs=1)
    torch.nn.init.constant_(head.heatmap[-1].bias, 0.0)  # untrained heatmaps near 0.5: boxes above the threshold
    torch.nn.init.normal_(head.heatmap[-1].weight, std=0.3)
    model = InspectionModel(encoder, FusionTransformer(embed_dim=32, depth=1, dropout=0.0), GradingHead(32, 4, dropout=0.0),
                            localization_head=head).eval()
    loaded = LoadedModel(model, ["ok", "mild", "moderate", "severe"], 64, 1, box_class_names=["crack", "finger"],
                         tasks=["grading", "localization"])
    return str(export_onnx(loaded, out_dir, parity_images=0).path)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module (2 CPUs, no dashboard), shut down at the end."""
    temp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_onnx(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """Real ELPV cells (spread over the dataset) with a corrupt, an empty and a non-image file among them."""
    from lineside.vision.elpv import elpv_records

    try:
        records = elpv_records()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    cells = [records[i].path for i in np.linspace(0, len(records) - 1, N_CELLS).astype(int)]
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    return cells[:4] + [str(d / "corrupt.png")] + cells[4:8] + [str(d / "empty.png"), str(d / "notes.txt")] + cells[8:]


def _rows(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def test_rows_equal_the_single_process_scorer(cluster, model, inputs, tmp_path, capsys):
    """``lineside score --engine ray --actors 2`` on a folder: the single-process scorer's rows, in its order."""
    from lineside.cli.score import main

    d = tmp_path / "cells"
    d.mkdir()
    for p in inputs:
        (d / p.rsplit("/", 1)[-1]).symlink_to(p)
    single = score(model, str(d), tmp_path / "single.csv", progress=False, batch_size=4)
    rc = main(["--model", model, "--input", str(d), "--output", str(d / "scores.csv"), "--engine", "ray", "--actors", "2",
               "--batch-size", "4", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"scored {N_CELLS}, errors 3, skipped (already done) 0 of {len(inputs)}" in out and "on Ray, 2" in out
    assert (single.scored, single.errors) == (N_CELLS, 3)
    cols_single, rows_single = _rows(tmp_path / "single.csv")
    cols_ray, rows_ray = _rows(d / "scores.csv")  # the results file in the input folder is not an input
    assert cols_ray == cols_single
    assert cols_ray[:4] == ["path", "grade", "grade_name", "confidence"] and "boxes" in cols_ray and cols_ray[-1] == "error"
    assert [r["path"] for r in rows_ray] == [r["path"] for r in rows_single] and len(rows_ray) == len(inputs)
    bad = {r["path"].rsplit("/", 1)[-1]: r for r in rows_ray if r["error"]}
    assert set(bad) == {"corrupt.png", "empty.png", "notes.txt"}
    assert all(r["grade"] == "" and r["path"] in r["error"] for r in bad.values())
    assert any(r["boxes"] not in ("", "[]") for r in rows_ray)  # boxes were compared, in each file's own pixels
    for a, b in zip(rows_ray, rows_single):
        assert a == b


def test_resume_skips_done_paths_and_parquet_matches(cluster, model, inputs, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "r.parquet"
    first = score_on_ray(model, inputs[:6], out, actors=1, batch_size=4, progress=False)
    assert (first.scored + first.errors, first.skipped) == (6, 0)
    again = score_on_ray(model, inputs, out, actors=2, batch_size=4, progress=False)
    assert (again.skipped, again.scored + again.errors, again.total) == (6, len(inputs) - 6, len(inputs))
    table = pq.read_table(out).to_pylist()
    assert [r["path"] for r in table] == inputs  # earlier rows first, then the new ones in input order
    score(model, inputs, tmp_path / "single.parquet", progress=False, batch_size=4)
    single = pq.read_table(tmp_path / "single.parquet")
    assert pq.read_table(out).schema == single.schema and table == single.to_pylist()
    done = score_on_ray(model, inputs, out, actors=1, progress=False)  # nothing left: no Ray work at all
    assert (done.skipped, done.scored, done.errors) == (len(inputs), 0, 0)
    assert len(pq.read_table(out)) == len(inputs)


def test_cli_refuses_what_ray_does_not_write(model, tmp_path, capsys):
    from lineside.cli.score import main

    rc = main(["--model", model, "--input", str(tmp_path), "--output", str(tmp_path / "x.csv"), "--engine", "ray",
               "--overlays", str(tmp_path / "ov")])
    assert rc == 2 and "--overlays: not available with --engine ray" in capsys.readouterr().err
