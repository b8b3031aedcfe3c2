"""Point clouds end to end: a point + grasp checkpoint exports to ONNX (clouds in sensor metres in, grasps in
sensor metres out, normalisation and decoding inside), with parity on real clouds, a TensorRT-RTX engine,
``lineside score`` on .ply / depth images / broken files, and the station on a folder of clouds."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import onnx
import open3d as o3d
import pytest
import torch

from lineside.runtime import OnnxRuntimeBackend, TorchBackend, load_backend
from lineside.export.checkpoint import instantiate_config, load_inspection_model
from lineside.export.deployable import build_deployable
from lineside.export.metadata import read_metadata
from lineside.cli.export import onnx_main as export_main
from lineside.export.parity import Tolerance, check_parity, compare_outputs
from lineside.export.point_inputs import PointPreprocessing, real_clouds, stack_inputs
from lineside.runtime.point_score import gripper_outline
from lineside.cli.score import main as score_main
from lineside.runtime.score import score
from lineside.runtime.sources import open_source
from lineside.runtime.station import Station
from lineside.pointcloud.io import CameraIntrinsics, PointCloud
from lineside.runtime.verify import verify_artefact

P = 256
D = 32
MODEL = {
    "class_path": "lineside.fusion.model.InspectionModel",
    "init_args": {
        "fusion": {"class_path": "lineside.fusion.fusion_transformer.FusionTransformer",
                   "init_args": {"embed_dim": D, "depth": 1, "num_heads": 2, "modalities": {"points": 3}}},
        "point_encoder": {"class_path": "lineside.pointcloud.point_encoder.PointEncoder",
                          "init_args": {"embed_dim": D, "num_groups": [32, 16], "group_sizes": [8, 8], "widths": [[16, 32], [32, 32]],
                                        "local_scales": [0.1, 0.3], "in_features": 3}},
        "grasp_head": {"class_path": "lineside.fusion.grasp_head.GraspHead", "init_args": {"embed_dim": D}},
    },
}
GRASP_OUTPUTS = ["grasp_position", "grasp_approach", "grasp_closing", "grasp_width", "grasp_score"]


def box_cloud(rng: np.random.Generator, size=(0.06, 0.04, 0.03), centre=(0.02, -0.01, 0.45), n: int = 900) -> np.ndarray:
    """Points on the surface of a box (metres), as a sensor 0.45 m away would see its part."""
    size, centre = np.asarray(size), np.asarray(centre)
    face = rng.integers(0, 6, n)
    p = rng.uniform(-0.5, 0.5, (n, 3))
    axis = face // 2
    p[np.arange(n), axis] = np.where(face % 2, 0.5, -0.5)
    return p * size + centre


def write_ply(path: Path, points: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert o3d.io.write_point_cloud(str(path), o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points)))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny point + grasp InspectionModel saved as the Lightning CLI saves it (state_dict under ``model.``,
    the model config and the point preprocessing under ``lineside``)."""
    torch.manual_seed(0)
    model = instantiate_config(MODEL)
    with torch.no_grad():  # spread the graspability logits, as a trained head does, so the ranking is not a near-tie
        model.grasp_head.out.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("ckpt") / "grasp.ckpt"
    torch.save({
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": MODEL},
        "lineside": {"class_names": [], "tasks": ["grasp"], "model_config": MODEL, "image_size": None, "channels": 0,
                     "grasp_top_k": 4, "grasp_nms_radius": 0.01,
                     "points": {"num_points": P, "features": "normals", "voxel_size": 0.002, "normal_radius": 0.01,
                                "normalisation": "centroid, unit ball"}},
    }, path)
    return path


@pytest.fixture(scope="module")
def clouds(tmp_path_factory) -> Path:
    """Box-shaped parts of several sizes as .ply clouds in metres (the parity set when ../shared is absent)."""
    root = tmp_path_factory.mktemp("clouds")
    rng = np.random.default_rng(1)
    for i in range(5):
        write_ply(root / f"part{i}.ply", box_cloud(rng, size=(0.04 + 0.01 * i, 0.03, 0.02 + 0.005 * i), centre=(0.01 * i, 0.0, 0.4 + 0.02 * i)))
    return root


@pytest.fixture(scope="module")
def exported(ckpt, clouds, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    assert export_main(["--ckpt", str(ckpt), "--out", str(out), "--calib", str(clouds), "--parity-images", "5", "--batch-sizes", "1,4"]) == 0
    return out / "model.onnx"


def test_graph_takes_padded_clouds_and_gives_grasps_listed_in_metadata(exported, ckpt):
    graph = onnx.load(str(exported))
    inputs = {i.name: (i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in graph.graph.input}
    assert inputs == {"points": (onnx.TensorProto.FLOAT, ["N", P, 3]), "point_mask": (onnx.TensorProto.BOOL, ["N", P]),
                      "point_normals": (onnx.TensorProto.FLOAT, ["N", P, 3])}
    assert [o.name for o in graph.graph.output] == GRASP_OUTPUTS
    meta = read_metadata(exported)
    assert [(s["name"], s["dtype"], s["shape"]) for s in meta["inputs"]] == [
        ("points", "float32", ["N", P, 3]), ("point_mask", "bool", ["N", P]), ("point_normals", "float32", ["N", P, 3])]
    assert [(s["name"], s["shape"]) for s in meta["outputs"]] == [
        ("grasp_position", ["N", 4, 3]), ("grasp_approach", ["N", 4, 3]), ("grasp_closing", ["N", 4, 3]),
        ("grasp_width", ["N", 4]), ("grasp_score", ["N", 4])]
    assert meta["outputs"][0]["atol"] == 1e-3  # positions: parity within 1 mm
    assert meta["points"]["num_points"] == P and meta["points"]["features"] == "normals" and meta["points"]["voxel_size"] == 0.002
    assert meta["points"]["top_k"] == 4 and meta["task"] == "grasp"  # the decoder settings the checkpoint records
    assert meta["tensorrt_unsupported_ops"] == {}
    assert meta["parity"]["ok"] and meta["parity"]["n_images"] == 5
    assert {r["output"] for r in meta["parity"]["rows"]} == set(GRASP_OUTPUTS)


def test_parity_on_real_workshop_tool_clouds(exported, ckpt, shared_data):
    loaded = load_inspection_model(ckpt)
    reference = TorchBackend(deployable=build_deployable(loaded), loaded=loaded)
    inputs, used = real_clouds(None, PointPreprocessing.from_loaded(loaded, reference.deployable), n=8)
    assert len(used) == 8 and all("workshop_tools" in p for p in used)
    report = check_parity(reference, OnnxRuntimeBackend(exported), inputs, "fp32", batch_size=3)
    assert report.ok, report.table()
    rows = {r.output: r for r in report.rows}
    assert rows["grasp_position"].metric == "top-1" and rows["grasp_position"].value == 1.0  # every top grasp within 1 mm
    ref = reference(inputs)
    ort = OnnxRuntimeBackend(exported)(inputs)
    np.testing.assert_allclose(ort["grasp_position"][:, 0], ref["grasp_position"][:, 0], atol=1e-3)  # the same top-1 grasp
    # grasps come back in the tools' own frame (metres), near the cloud they were proposed on
    pts = np.where(inputs["point_mask"][..., None], inputs["points"], np.nan)
    lo, hi = np.nanmin(pts, 1), np.nanmax(pts, 1)
    top = ref["grasp_position"][:, 0]
    assert ((top > lo - 0.05) & (top < hi + 0.05)).all()


def test_grasp_parity_tolerance_is_one_millimetre():
    spec = [{"name": "grasp_position", "kind": "float", "atol": 1e-3}, {"name": "grasp_score", "kind": "float"}]
    ref = {"grasp_position": np.zeros((2, 5, 3)), "grasp_score": np.zeros((2, 5))}
    near = {"grasp_position": np.full((2, 5, 3), 5e-4), "grasp_score": np.zeros((2, 5))}
    far = {"grasp_position": np.full((2, 5, 3), 2e-3), "grasp_score": np.full((2, 5), 2e-4)}
    assert all(r.ok for r in compare_outputs(ref, near, spec, Tolerance()))
    assert [r.ok for r in compare_outputs(ref, far, spec, Tolerance())] == [False, False]


def _padded(points: np.ndarray, normals: np.ndarray, order: np.ndarray, fill: float) -> dict[str, np.ndarray]:
    """The real points at the slots ``order`` of a P-row array whose other rows hold ``fill``."""
    x = np.full((1, P, 3), fill, np.float32)
    n = np.full((1, P, 3), fill, np.float32)
    m = np.zeros((1, P), bool)
    x[0, order], n[0, order], m[0, order] = points, normals, True
    return {"points": x, "point_mask": m, "point_normals": n}


def test_padding_and_translation(exported, ckpt, tmp_path):
    loaded = load_inspection_model(ckpt)
    prep = PointPreprocessing.from_loaded(loaded)
    item = prep.prepare(PointCloud(box_cloud(np.random.default_rng(3), n=150), source="small"))
    real = item["point_mask"]
    assert 16 <= real.sum() < P  # fewer points than P: the rest is padding
    pts, nrm = item["points"][real], item["point_normals"][real]
    ort, eager = OnnxRuntimeBackend(exported), TorchBackend(ckpt)
    base = ort(_padded(pts, nrm, np.arange(len(pts)), 0.0))
    scattered = np.sort(np.random.default_rng(0).choice(P, len(pts), replace=False))
    for backend in (ort, eager):
        for fill in (0.0, 1e6, np.nan):  # zeros, garbage and NaN in the padded rows change nothing
            other = backend(_padded(pts, nrm, scattered, fill))
            for name in GRASP_OUTPUTS:
                np.testing.assert_allclose(other[name], base[name], atol=1e-5, err_msg=f"{backend.name} {name} fill={fill}")
    assert base["grasp_score"][0, 0] > 0 and np.isfinite(base["grasp_position"]).all()
    # the graph centres and scales itself: a cloud moved by t gives grasps moved by t, same directions
    t = np.array([0.1, -0.05, 0.2], np.float32)
    moved = ort(_padded(pts + t, nrm, np.arange(len(pts)), 0.0))
    np.testing.assert_allclose(moved["grasp_position"], base["grasp_position"] + t, atol=1e-4)
    np.testing.assert_allclose(moved["grasp_approach"], base["grasp_approach"], atol=1e-4)
    np.testing.assert_allclose(moved["grasp_width"], base["grasp_width"], atol=1e-5)


def test_tensorrt_rtx_builds_the_point_graph(exported, tmp_path):
    from lineside.export.tensorrt import build_engine, import_tensorrt

    if import_tensorrt("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX is not installed here (pip install '.[tensorrt]')")
    r = build_engine(exported, tmp_path, "fp32", (1, 4), flavour="tensorrt_rtx", gpu_arch="8.6")
    assert r.path.stat().st_size > 10_000 and r.layers > 20
    meta = read_metadata(r.path)
    assert [s["name"] for s in meta["inputs"]] == ["points", "point_mask", "point_normals"]
    assert [s["name"] for s in meta["outputs"]] == GRASP_OUTPUTS
    assert meta["batch_profile"] == {"min": 1, "opt": 4, "max": 4} and meta["points"]["num_points"] == P


def test_fp16_point_graph_is_refused_with_the_reason(ckpt, tmp_path):
    from lineside.export.onnx_export import export_onnx

    with pytest.raises(ValueError, match="fp16 graphs of point models.*fp32"):
        export_onnx(ckpt, tmp_path, fp16=True, parity_images=0)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def scan_folder(tmp_path) -> Path:
    d = tmp_path / "scans"
    rng = np.random.default_rng(7)
    write_ply(d / "good.ply", box_cloud(rng))
    np.save(d / "good_npy.npy", box_cloud(rng, centre=(0.0, 0.05, 0.5)).astype(np.float32))
    (d / "broken.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 100\nproperty float x\nend_header\n1 2\n")
    (d / "empty.pcd").write_bytes(b"")
    write_ply(d / "millimetres.ply", box_cloud(rng) * 1000.0)
    # a depth camera's frame: a 16-bit PNG in mm with its intrinsics beside it
    import cv2

    k = CameraIntrinsics(fx=200.0, fy=200.0, cx=40.0, cy=30.0, width=80, height=60)
    depth = np.zeros((60, 80), np.uint16)
    depth[15:45, 20:60] = 420  # a 0.42 m plate
    depth[25:35, 30:50] = 400  # with a boss toward the camera
    cv2.imwrite(str(d / "depth.png"), depth)
    (d / "depth.json").write_text(k.to_json())
    return d


def test_score_writes_grasps_per_cloud_and_errors_per_row(exported, scan_folder, tmp_path):
    out = tmp_path / "grasps.csv"
    s = score(str(exported), str(scan_folder), out, overlays=tmp_path / "ov", batch_size=2, num_workers=0, progress=False)
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    assert set(rows) == {"good.ply", "good_npy.npy", "broken.ply", "empty.pcd", "millimetres.ply", "depth.png"}  # depth.json: intrinsics, no row
    assert s.scored == 3 and s.errors == 3
    assert "broken.ply" in rows["broken.ply"]["error"] and "truncated" in rows["broken.ply"]["error"]  # 1 of 100 vertex lines
    assert "empty" in rows["empty.pcd"]["error"] and "millimetres" in rows["millimetres.ply"]["error"]
    for name in ("good.ply", "good_npy.npy", "depth.png"):
        r = rows[name]
        assert r["error"] == ""
        grasps = json.loads(r["grasps"])
        assert len(grasps) == int(r["num_grasps"]) >= 1 and float(r["best_score"]) == grasps[0]["score"]
        assert [g["score"] for g in grasps] == sorted((g["score"] for g in grasps), reverse=True)
        for g in grasps:
            assert np.linalg.norm(g["approach"]) == pytest.approx(1, abs=1e-4) and abs(np.dot(g["approach"], g["closing"])) < 1e-4
            assert g["width"] > 0 and 0.3 < g["position"][2] < 0.6  # metres, in front of the sensor, near the part
    assert 16 <= int(rows["good.ply"]["points"]) <= P
    pngs = sorted(p.name for p in (tmp_path / "ov").rglob("*.png"))
    assert pngs == ["depth.png.png", "good.ply.png", "good_npy.npy.png"]
    # a second run resumes: nothing is scored again
    again = score(str(exported), str(scan_folder), out, batch_size=2, num_workers=0, progress=False)
    assert again.skipped == 6 and again.scored == 0 and len(_rows(out)) == 6


def test_score_cli_on_the_checkpoint_with_eager_torch(ckpt, tmp_path, capsys):
    rng = np.random.default_rng(5)
    for tool in ("wrench", "pliers"):  # one file name per tool folder, as the workshop tools ship them
        write_ply(tmp_path / "tools" / tool / "point-cloud.ply", box_cloud(rng))
    out = tmp_path / "g.parquet"
    assert score_main(["--model", str(ckpt), "--backend", "torch", "--input", str(tmp_path / "tools" / "*" / "point-cloud.ply"),
                       "--output", str(out), "--overlays", str(tmp_path / "ov"), "--no-progress"]) == 0
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 2 and all(r["error"] == "" and r["num_grasps"] == len(json.loads(r["grasps"])) >= 1 for r in rows)
    assert all(isinstance(r["points"], int) for r in rows)
    assert sorted(str(p.relative_to(tmp_path / "ov")) for p in (tmp_path / "ov").rglob("*.png")) == [
        "pliers/point-cloud.ply.png", "wrench/point-cloud.ply.png"]  # same-named clouds keep their folders
    assert "scored 2, errors 0" in capsys.readouterr().out


def test_gripper_outline_puts_the_fingers_at_the_contacts():
    lines = gripper_outline([0, 0, 0.4], [0, 0, 1], [1, 0, 0], 0.03, finger_depth=0.04, tip_margin=0.005)
    left, right, palm, wrist = lines
    assert np.allclose(left[1], [0.015, 0, 0.405]) and np.allclose(right[1], [-0.015, 0, 0.405])  # fingertips past the contacts
    assert np.allclose(palm[:, 2], 0.365) and np.allclose(wrist[1], [0, 0, 0.325])


def test_station_on_a_folder_of_clouds(exported, scan_folder, tmp_path):
    backend = load_backend(exported)
    source = open_source(str(scan_folder), once=True, settle=0.0, poll=0.01)
    out = tmp_path / "r.jsonl"
    summary = Station(backend, source, out, batch_max=4, latency_budget_ms=50, report_every=0, log=io.StringIO(), warmup=True).run()
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"good.ply", "good_npy.npy", "broken.ply", "empty.pcd", "millimetres.ply", "depth.png"}
    assert summary.frames == 6 and summary.errors == 3
    good = records["good.ply"]
    assert good["error"] is None and good["grasps"] and "outputs" not in good
    assert set(good["grasps"][0]) == {"position", "approach", "closing", "width", "score"}
    assert records["broken.ply"]["grasps"] is None and "broken.ply" in records["broken.ply"]["error"]
    # the station and score agree on a file
    ref = OnnxRuntimeBackend(exported)(stack_inputs([PointPreprocessing.from_metadata(backend.metadata).load(scan_folder / "good.ply")]))
    np.testing.assert_allclose(good["grasps"][0]["position"], ref["grasp_position"][0, 0], atol=1e-5)


def test_image_and_point_model_takes_frames_and_clouds(tmp_path, clouds):
    """An image + point model (both modalities in one fusion transformer) takes frames and clouds in one graph."""
    import copy

    from lineside.export.checkpoint import LoadedModel
    from lineside.export.onnx_export import export_onnx

    cfg = copy.deepcopy(MODEL)
    cfg["init_args"]["image_encoder"] = {"class_path": "lineside.vision.ImageEncoder", "init_args": {
        "backbone": "test_efficientnet", "embed_dim": D, "in_chans": 1, "feature_levels": [-1], "pretrained": False}}
    cfg["init_args"]["fusion"]["init_args"]["modalities"] = {"image": 2, "points": 3}
    torch.manual_seed(0)
    model = instantiate_config(cfg).eval()
    with torch.no_grad():
        model.grasp_head.out.weight.mul_(8.0)
    r = export_onnx(LoadedModel(model, [], 64, 1, points={"num_points": P}), tmp_path, calib=clouds, parity_images=4,
                    verify=verify_artefact)
    assert r.ok, r.parity.table()
    assert [s["name"] for s in r.metadata["inputs"]] == ["image", "points", "point_mask", "point_normals"]
    assert r.metadata["inputs"][0]["shape"] == ["N", 1, 64, 64] and [s["name"] for s in r.metadata["outputs"]] == GRASP_OUTPUTS
    ort = OnnxRuntimeBackend(r.path)
    x = {**stack_inputs([PointPreprocessing(num_points=P).load(clouds / "part0.ply")]), "image": np.zeros((1, 1, 64, 64), np.uint8)}
    dark, bright = ort(x)["grasp_position"], ort({**x, "image": np.full((1, 1, 64, 64), 255, np.uint8)})["grasp_position"]
    assert np.isfinite(dark).all() and not np.allclose(dark, bright)  # the image tokens reach the grasp head


def test_depth_images_need_intrinsics_given_or_beside_them(exported, tmp_path):
    import cv2

    d = tmp_path / "depth"
    d.mkdir()
    depth = np.zeros((60, 80), np.uint16)
    depth[10:50, 15:65] = 450
    cv2.imwrite(str(d / "frame.png"), depth)
    k = CameraIntrinsics(fx=200.0, fy=200.0, cx=40.0, cy=30.0, width=80, height=60)
    (tmp_path / "cam.json").write_text(k.to_json())
    score(str(exported), str(d), tmp_path / "none.csv", num_workers=0, progress=False)
    (row,) = _rows(tmp_path / "none.csv")
    assert "needs pinhole intrinsics" in row["error"] and "frame.png" in row["error"]
    score(str(exported), str(d), tmp_path / "k.csv", num_workers=0, progress=False, intrinsics=tmp_path / "cam.json")
    (row,) = _rows(tmp_path / "k.csv")
    assert row["error"] == "" and json.loads(row["grasps"])[0]["position"][2] == pytest.approx(0.45, abs=0.05)
    out = tmp_path / "r.jsonl"
    Station(load_backend(exported), open_source(str(d), once=True, settle=0.0, poll=0.01), out, report_every=0, log=io.StringIO(),
            warmup=False, intrinsics=tmp_path / "cam.json").run()
    (record,) = map(json.loads, out.read_text().splitlines())
    assert record["error"] is None and record["grasps"][0]["position"] == json.loads(row["grasps"])[0]["position"]
