"""``lineside serve`` on Ray Serve, started for real on a local Ray instance: real ELPV cells sent as encoded uploads,
multipart forms and raw uint8 frames get the station's record with ``lineside score``'s decisions and probabilities;
a corrupt upload gets an error record."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
ray = pytest.importorskip("ray", reason="lineside serve needs ray[serve]: pip install 'lineside[plant]'")
pytest.importorskip("ray.serve")

from test_ray_score import tiny_onnx  # noqa: E402

from lineside.runtime.score import score  # noqa: E402
from lineside.vision.io import read_image  # noqa: E402

N_CELLS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_onnx(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def cells() -> list[str]:
    from lineside.vision.elpv import elpv_records

    try:
        records = elpv_records()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return [records[i].path for i in np.linspace(0, len(records) - 1, N_CELLS).astype(int)]


@pytest.fixture(scope="module")
def server(model):
    """``serve_model`` on a local Ray instance (2 CPUs, 1 replica, batches of up to 4); Serve and Ray shut down after."""
    from ray import serve

    from lineside.runtime.serve import serve_model

    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    try:
        url = serve_model(model, host="127.0.0.1", port=_free_port(), replicas=1, max_batch=4, batch_wait_ms=20)
        for _ in range(120):  # the proxy answers once the replica is up
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    info = json.loads(r.read())
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        else:
            pytest.fail(f"{url} did not answer")
        assert info["backend"] == "onnxruntime" and info["class_names"] == ["ok", "mild", "moderate", "severe"]
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _expected(model, cells, tmp_path) -> dict[str, dict]:
    import csv

    score(model, cells, tmp_path / "single.csv", progress=False, batch_size=4)
    with open(tmp_path / "single.csv", newline="", encoding="utf-8") as fh:
        return {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(fh)}


def _same(record: dict, row: dict) -> None:
    assert record["error"] is None and record["source"] == "http" and record["latency_ms"] > 0
    assert record["decision"] == row["grade_name"] and record["grade"] == int(row["grade"])
    assert abs(record["confidence"] - float(row["confidence"])) <= 2e-6
    for name, p in record["probabilities"].items():
        assert abs(p - float(row[f"p_{name}"])) <= 2e-6
    assert [b["label"] for b in record["boxes"]] == [b["label"] for b in json.loads(row["boxes"])]  # in the file's pixels
    for got, want in zip(record["boxes"], json.loads(row["boxes"])):
        assert np.allclose(got["box"], want["box"], atol=0.2) and abs(got["score"] - want["score"]) <= 1e-3


def test_uploads_answer_as_lineside_score(server, model, cells, tmp_path):
    expected = _expected(model, cells, tmp_path)

    def upload(path: str) -> tuple[int, dict]:
        with open(path, "rb") as fh:
            return _post(server, fh.read(), {"Content-Type": "image/png", "X-Filename": path.rsplit("/", 1)[-1]})

    with ThreadPoolExecutor(N_CELLS) as pool:  # concurrent requests: served in dynamic batches
        answers = list(pool.map(upload, cells))
    for path, (status, record) in zip(cells, answers):
        assert status == 200, record
        assert record["path"] == path.rsplit("/", 1)[-1]
        _same(record, expected[record["path"]])
    assert len({r["frame"] for _, r in answers}) == N_CELLS


def test_multipart_and_raw_frames(server, model, cells, tmp_path):
    expected = _expected(model, cells[:2], tmp_path)
    name = cells[0].rsplit("/", 1)[-1]
    boundary = uuid.uuid4().hex
    with open(cells[0], "rb") as fh:
        data = fh.read()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, record = _post(server, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and record["path"] == name
    _same(record, expected[name])

    pixels = read_image(cells[1], 1)  # (H, W, 1) uint8, as a camera would hand it over
    h, w = pixels.shape[:2]
    status, record = _post(server + f"?shape={h},{w}", pixels.tobytes(), {"Content-Type": "application/octet-stream"})
    assert status == 200 and record["path"] is None
    _same(record, expected[cells[1].rsplit("/", 1)[-1]])
    rgb = np.repeat(pixels, 3, axis=2)  # an RGB camera frame of a grey cell: the same grey image after conversion
    status, record = _post(server, rgb.tobytes(), {"Content-Type": "application/octet-stream", "X-Frame-Shape": f"{h},{w},3"})
    assert status == 200
    _same(record, expected[cells[1].rsplit("/", 1)[-1]])


def test_bad_inputs_get_error_records(server):
    status, record = _post(server, b"\x89PNG\r\n\x1a\n not really", {"Content-Type": "image/png", "X-Filename": "broken.png"})
    assert status == 422 and record["decision"] is None and record["boxes"] is None
    assert record["error"].startswith("broken.png: ") and "corrupt" in record["error"]
    status, record = _post(server + "?shape=10,10", b"\x00" * 99, {"Content-Type": "application/octet-stream"})
    assert status == 422 and "99 bytes" in record["error"]
    status, record = _post(server, b"", {"Content-Type": "image/png"})
    assert status == 422 and "empty" in record["error"]


def test_cli_reports_a_missing_model(tmp_path, capsys):
    from lineside.cli.serve import main

    assert main(["--model", str(tmp_path / "missing.onnx"), "--port", str(_free_port())]) == 2
    assert "missing.onnx" in capsys.readouterr().err
