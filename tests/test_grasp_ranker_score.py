"""A grasp ranker file as a ``lineside score`` / ``station`` model: recognised by its content, the same
``grasps`` column as a grasp network, per-row errors, resume; and the inference part kept apart from training."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lineside.cli.score import main as score_main
from lineside.fusion.grasp_ranker import GraspRanker, GraspRankerConfig, is_ranker_file
from lineside.pointcloud.grasp_candidates import CandidateConfig
from lineside.pointcloud.grasp_labels import ParallelJawGripper
from lineside.runtime.open_model import open_model
from lineside.runtime.ranker_backend import RankerBackend
from lineside.vision.io import InputError

TOOLS = ("Allen Key", "Screwdriver")


@pytest.fixture(scope="module")
def ranker_file(tmp_path_factory) -> Path:
    """A small ranker with random weights (the CLI path does not depend on what it learnt), saved with an
    odd suffix: it is recognised by its content."""
    torch.manual_seed(0)
    ranker = GraspRanker(GraspRankerConfig(crop_points=16, widths=(8, 16), hidden=16),
                         CandidateConfig(num_antipodal_seeds=60, num_slab_seeds=30, max_candidates=48), ParallelJawGripper(max_width=0.08))
    return ranker.save(tmp_path_factory.mktemp("ranker") / "tiny.ranker")


@pytest.fixture
def tool_folder(shared_data, tmp_path) -> Path:
    folder = tmp_path / "clouds"
    folder.mkdir()
    for tool in TOOLS:
        src = shared_data / "workshop_tools" / "tools" / tool / "point-cloud.ply"
        if not src.is_file():
            pytest.skip(f"{src} is absent")
        (folder / f"{tool.replace(' ', '_')}.ply").symlink_to(src)
    (folder / "broken.ply").write_text("ply\nformat ascii 1.0\nelement vertex 100\nproperty float x\nend_header\n1 2\n")
    return folder


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f)}


def test_score_cli_takes_a_ranker_file_and_writes_grasps(ranker_file, tool_folder, tmp_path, capsys):
    out = tmp_path / "grasps.csv"
    args = ["--model", str(ranker_file), "--input", str(tool_folder), "--output", str(out), "--batch-size", "4", "--no-progress"]
    assert score_main(args) == 0
    rows = _rows(out)
    assert set(rows) == {"Allen_Key.ply", "Screwdriver.ply", "broken.ply"}
    assert "broken.ply" in rows["broken.ply"]["error"] and rows["broken.ply"]["grasps"] == ""
    for name in ("Allen_Key.ply", "Screwdriver.ply"):
        r = rows[name]
        assert r["error"] == "" and int(r["points"]) > 100
        grasps = json.loads(r["grasps"])
        assert 1 <= len(grasps) == int(r["num_grasps"]) <= 5 and float(r["best_score"]) == grasps[0]["score"]
        assert [g["score"] for g in grasps] == sorted((g["score"] for g in grasps), reverse=True)
        for g in grasps:
            assert set(g) == {"position", "approach", "closing", "width", "score"}
            assert 0 < g["width"] <= 0.08 and 0 < g["score"] <= 1
            assert np.linalg.norm(g["approach"]) == pytest.approx(1, abs=1e-4) and abs(np.dot(g["approach"], g["closing"])) < 1e-3
    assert "grasp ranker (tiny.ranker)" in capsys.readouterr().out
    # a second run resumes: nothing is scored again
    assert score_main(args) == 0
    assert len(_rows(out)) == 3 and "scored 0" in capsys.readouterr().out


def test_a_cloud_the_ranker_cannot_take_is_its_own_error_row(ranker_file, tmp_path):
    """A batch in which one prepared cloud fails inference: only that cloud gets the error."""
    backend = RankerBackend(ranker_file)
    calls = []
    real = backend.ranker.suggest

    def suggest(points, normals, k=5, rng=0):
        calls.append(len(points))
        if float(points[:, 0].mean()) > 0.05:
            raise ValueError("cloud: degenerate")
        return real(points, normals, k, rng)

    backend.ranker.suggest = suggest
    rng = np.random.default_rng(0)
    folder = tmp_path / "c"
    folder.mkdir()
    for name, shift in (("a.xyz", 0.0), ("b.xyz", 0.2)):
        box = rng.uniform([-0.03, -0.02, 0.44], [0.03, 0.02, 0.46], (1500, 3)) + [shift, 0, 0]
        np.savetxt(folder / name, box)
    from lineside.runtime.point_score import score_points

    s = score_points(backend, str(folder), tmp_path / "g.csv", batch_size=4, num_workers=0, progress=False)
    rows = _rows(tmp_path / "g.csv")
    assert s.scored == 1 and s.errors == 1
    assert rows["a.xyz"]["error"] == "" and "degenerate" in rows["b.xyz"]["error"] and "b.xyz" in rows["b.xyz"]["error"]


def test_ranker_files_are_recognised_by_content_only(ranker_file, tmp_path):
    assert is_ranker_file(ranker_file)
    other = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    (tmp_path / "text.pt").write_text("not a zip")
    assert not is_ranker_file(other) and not is_ranker_file(tmp_path / "text.pt") and not is_ranker_file(tmp_path / "missing.pt")
    backend = open_model(str(ranker_file))
    assert isinstance(backend, RankerBackend) and backend.takes_points and backend.num_points == 1024
    with pytest.raises(InputError, match="--tta"):
        open_model(str(ranker_file), tta_views=2)


def test_station_records_grasps_from_a_ranker(ranker_file, tool_folder, tmp_path):
    from lineside.runtime.sources import open_source
    from lineside.runtime.station import Station

    source = open_source(str(tool_folder), once=True, settle=0.0, poll=0.01)
    out = tmp_path / "r.jsonl"
    summary = Station(open_model(str(ranker_file)), source, out, batch_max=4, latency_budget_ms=50, report_every=0, log=io.StringIO(),
                      warmup=False).run()
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert summary.frames == 3 and summary.errors == 1
    assert records["broken.ply"]["grasps"] is None and "broken.ply" in records["broken.ply"]["error"]
    good = records["Allen_Key.ply"]
    assert good["error"] is None and good["grasps"] and all(g["width"] > 0 for g in good["grasps"])


@pytest.mark.slow  # a fresh interpreter imports torch: 15-50 s on a loaded 2-core machine
def test_runtime_loads_the_ranker_without_training_code(ranker_file):
    import subprocess
    import sys

    code = ("import sys; from lineside.runtime.open_model import open_model; "
            f"b = open_model({str(ranker_file)!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') "
            "or m == 'lineside.fusion.grasp_ranker_train'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
