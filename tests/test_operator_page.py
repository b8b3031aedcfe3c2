"""The station's Prometheus metrics, health and operator page (``lineside station --http``): counted
from the records the station writes, labels in the file A/B shadow switching reads, and the page in
a real browser (Playwright + the system Chromium) on a station fed real ELPV cells."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest
from PIL import Image

from lineside.runtime import Backend
from lineside.runtime.shadow import LabelBook
from lineside.runtime.sources import GlobSource
from lineside.runtime.station import Station

prometheus_client = pytest.importorskip("prometheus_client", reason="station metrics need prometheus-client (lineside[plant])")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lineside.runtime.metrics import StationMetrics  # noqa: E402
from lineside.runtime.operator_page import LabelFile, labels_target, open_operator_page, parse_http_address  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "tests" / "data" / "pre_namespace_tiny.ckpt"
CHROMIUM = "/usr/bin/chromium"
N_CELLS = 6


def samples(text: str) -> dict[tuple, float]:
    """Prometheus text → {(sample name, sorted label items): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def elpv_cells(tmp_path_factory) -> Path:
    """A folder of real ELPV cells (the installed ``elpv-dataset`` package), two of each grade but one."""
    from lineside.vision.elpv import elpv_records

    records = elpv_records()
    folder = tmp_path_factory.mktemp("elpv_cells")
    picked: dict[int, int] = {}
    for r in records:
        if picked.get(r.label, 0) < 2 and sum(picked.values()) < N_CELLS:
            picked[r.label] = picked.get(r.label, 0) + 1
            shutil.copy(r.path, folder / Path(r.path).name)
    assert len(list(folder.glob("*.png"))) == N_CELLS
    return folder


# -- metrics and health, no browser -------------------------------------------------------------


def test_metrics_count_records_by_grade_with_latency_and_model_info() -> None:
    m = StationMetrics({"name": "v3.onnx", "version": "abc123def456"}, ["ok", "crack"])
    m.observe([
        {"source": "s", "frame": 0, "timestamp": "t0", "decision": "ok", "latency_ms": 12.0, "error": None},
        {"source": "s", "frame": 1, "timestamp": "t1", "decision": "crack", "latency_ms": 40.0, "error": None},
        {"source": "s", "frame": 2, "timestamp": "t2", "decision": "crack", "latency_ms": 400.0, "error": None},
        {"source": "s", "frame": 3, "timestamp": "t3", "decision": None, "latency_ms": 1.0, "error": "corrupt file"},
        {"source": "s", "frame": 4, "timestamp": "t4", "decision": None, "latency_ms": 1.0, "error": "dropped: behind"},
        {"event": "station_status", "frames": 5},  # no frame: not counted
    ])
    m.label("corrected")
    body, ctype = m.exposition()
    assert ctype.startswith("text/plain")
    s = samples(body.decode())
    assert s[("lineside_station_frames_total", ())] == 5
    assert s[("lineside_station_errors_total", ())] == 2
    assert s[("lineside_station_dropped_total", ())] == 1
    assert s[("lineside_station_decisions_total", (("grade", "ok"),))] == 1
    assert s[("lineside_station_decisions_total", (("grade", "crack"),))] == 2
    assert s[("lineside_station_latency_seconds_count", ())] == 3  # graded frames only
    assert s[("lineside_station_latency_seconds_sum", ())] == pytest.approx(0.452)
    assert s[("lineside_station_latency_seconds_bucket", (("le", "0.05"),))] == 2
    assert s[("lineside_station_operator_labels_total", (("verdict", "corrected"),))] == 1
    assert s[("lineside_station_model_info", (("name", "v3.onnx"), ("version", "abc123def456")))] == 1
    health = m.health()
    assert health["ok"] and health["frames"] == 5 and health["errors"] == 2 and health["last_frame"] == "t4"
    assert health["model"]["version"] == "abc123def456"
    assert not m.health(running=False)["ok"]


def test_http_address_and_labels_target(tmp_path: Path) -> None:
    assert parse_http_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_http_address(":0") == ("127.0.0.1", 0)
    assert parse_http_address("[::1]:9000") == ("::1", 9000)
    with pytest.raises(ValueError, match="--http"):
        parse_http_address("localhost:http")
    assert labels_target(tmp_path) == tmp_path / "operator.csv"
    assert labels_target(tmp_path / "l.csv") == tmp_path / "l.csv"


def test_labels_written_are_the_labels_shadow_switching_reads(tmp_path: Path) -> None:
    target = tmp_path / "labels" / "operator.csv"
    f = LabelFile(target, ["ok", "crack"])
    f.append(str(tmp_path / "a.png"), "crack")
    f.append("b.png", "ok")
    with pytest.raises(ValueError, match="no class"):
        f.append("c.png", "severe")
    assert target.read_text().splitlines()[0] == "path,label"
    book = LabelBook(tmp_path / "labels", ["ok", "crack"])
    assert book.poll() == {str(tmp_path / "a.png"): "crack", os.path.abspath("b.png"): "ok"}


class HeatBackend(Backend):
    """Scripted grading model with a ``grade_heatmap`` output (hot in the frame's top-left quarter)."""

    name = "scripted"

    def __init__(self) -> None:
        super().__init__("<heat>")
        self.metadata = {
            "class_names": ["ok", "crack"],
            "inputs": [{"name": "image", "dtype": "uint8", "shape": ["N", 1, 32, 32]}],
            "outputs": [
                {"name": "grade_probs", "dtype": "float32", "shape": ["N", 2], "kind": "float"},
                {"name": "grade", "dtype": "int64", "shape": ["N"], "kind": "decoded"},
                {"name": "grade_heatmap", "dtype": "float32", "shape": ["N", 1, 8, 8], "kind": "float"},
            ],
        }

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        n = len(image)
        heat = np.zeros((n, 1, 8, 8), np.float32)
        heat[:, :, :4, :4] = 1.0
        return {"grade_probs": np.tile([[0.3, 0.7]], (n, 1)).astype(np.float32), "grade": np.ones(n, np.int64), "grade_heatmap": heat}


def test_station_feeds_the_page_metrics_and_overlays(tmp_path: Path) -> None:
    """A station run in process: /metrics counts every frame, /health answers, each frame's overlay
    carries the model's heatmap, a label is appended and counted."""
    for i in range(5):
        Image.fromarray(np.full((64, 64), 40 * i, np.uint8)).save(tmp_path / f"f{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    backend = HeatBackend()
    server = open_operator_page(backend, "127.0.0.1:0", tmp_path / "labels.csv", keep=10)
    station = Station(backend, GlobSource(str(tmp_path / "*.png")), tmp_path / "r.jsonl", batch_max=4, report_every=0,
                      warmup=False, observer=server.state)
    with server:
        station.run()
        status, body, _ = get(server.url + "/metrics")
        s = samples(body.decode())
        assert status == 200 and s[("lineside_station_frames_total", ())] == 6
        assert s[("lineside_station_errors_total", ())] == 1
        assert s[("lineside_station_decisions_total", (("grade", "crack"),))] == 5
        status, body, _ = get(server.url + "/health")
        health = json.loads(body)
        assert status == 200 and health["ok"] and health["frames"] == 6 and health["model"]["name"] == "<heat>"
        state = json.loads(get(server.url + "/api/state")[1])
        assert len(state["frames"]) == 6 and state["decisions"] == {"ok": 0, "crack": 5} and state["p50_ms"] > 0
        good = [f for f in state["frames"] if not f["error"]]
        assert all(f["heatmap"] and f["image"] and f["can_label"] for f in good)
        bad = next(f for f in state["frames"] if f["error"])
        assert not bad["can_label"] and get(f"{server.url}/frame/{bad['id']}.png")[0] == 404
        # the overlay: the heatmap's hot quarter is tinted, the cold rest keeps the frame's grey
        dark = next(f for f in good if f["name"] == "f0.png")
        status, png, ctype = get(f"{server.url}/frame/{dark['id']}.png")
        assert status == 200 and ctype == "image/png"
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        h, w, _ = rgb.shape
        assert min(h, w) >= 256  # small frames are enlarged for the page
        hot, cold = rgb[: h // 4, : w // 4].reshape(-1, 3).mean(0), rgb[-h // 4:, -w // 4:].reshape(-1, 3).mean(0)
        assert hot[0] > 100 and hot[0] > hot[2] + 50 and np.allclose(cold, 0, atol=2)
        # one label: appended, counted on the page and in /metrics; a wrong one is refused
        status, answer = post(server.url + "/label", {"id": dark["id"], "label": "ok"})
        assert status == 200 and answer["verdict"] == "corrected"
        assert post(server.url + "/label", {"id": dark["id"], "label": "severe"})[0] == 400
        assert post(server.url + "/label", {"id": 999, "label": "ok"})[0] == 404
        state = json.loads(get(server.url + "/api/state")[1])
        assert state["labels"] == {"ok": 1, "crack": 0} and state["verdicts"] == {"confirmed": 0, "corrected": 1}
        s = samples(get(server.url + "/metrics")[1].decode())
        assert s[("lineside_station_operator_labels_total", (("verdict", "corrected"),))] == 1
    assert LabelBook(tmp_path / "labels.csv", ["ok", "crack"]).poll() == {str(tmp_path / "f0.png"): "ok"}
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(records) == 6  # the page changed nothing in the results file


def test_cli_http_flag_checks(tmp_path: Path, capsys) -> None:
    from lineside.cli.station import main as station_main

    with pytest.raises(SystemExit):
        station_main(["--model", str(CKPT), "--source", str(tmp_path), "--out", str(tmp_path / "r.jsonl"), "--labels", "l.csv"])
    assert "--shadow" in capsys.readouterr().err
    code = station_main(["--model", str(CKPT), "--source", str(tmp_path), "--out", str(tmp_path / "r.jsonl"), "--http", "127.0.0.1:x"])
    assert code == 2 and "--http '127.0.0.1:x'" in capsys.readouterr().err


# -- the page in a real browser ----------------------------------------------------------------


def _chromium_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install 'lineside[plant]'; CI installs it)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no system Chromium at {CHROMIUM} (apt install chromium; CI installs it)")
    return sync_playwright


def _start_station(cells: Path, tmp_path: Path) -> tuple[subprocess.Popen, str, list[str]]:
    """``lineside station --http 127.0.0.1:0`` on a watched folder; returns the process, the page URL, its stderr lines."""
    cmd = [sys.executable, "-m", "lineside", "station", "--model", str(CKPT), "--backend", "torch", "--source", str(cells),
           "--out", str(tmp_path / "r.jsonl"), "--http", "127.0.0.1:0", "--labels", str(tmp_path / "labels.csv"),
           "--report-every", "0", "--no-warmup"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "operator page http://" in line and not url:
                url.append(line.split("operator page ", 1)[1].split("/ ", 1)[0])
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(240) or not url:
        proc.kill()
        pytest.fail("station did not start its page:\n" + "".join(lines[-40:]))
    return proc, url[0], lines


def test_operator_page_in_a_real_browser(elpv_cells: Path, tmp_path: Path) -> None:
    sync_playwright = _chromium_or_skip()
    proc, url, lines = _start_station(elpv_cells, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while json.loads(get(url + "/health")[1])["frames"] < N_CELLS:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines[-40:])
            time.sleep(0.2)
        health = json.loads(get(url + "/health")[1])
        assert health["ok"] is True and health["frames"] == N_CELLS and health["model"]["name"]
        s = samples(get(url + "/metrics")[1].decode())
        assert s[("lineside_station_frames_total", ())] == N_CELLS
        decisions = {dict(k[1])["grade"]: v for k, v in s.items() if k[0] == "lineside_station_decisions_total"}
        assert sum(decisions.values()) == N_CELLS

        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
            try:
                page = browser.new_page()
                page.goto(url + "/")
                cards = page.locator(".frame")
                cards.first.wait_for(timeout=20_000)
                assert cards.count() == N_CELLS
                page.wait_for_function("[...document.querySelectorAll('.frame img')].every(i => i.complete && i.naturalWidth > 0)",
                                       timeout=20_000)
                shown = page.locator(".frame .fname").all_text_contents()
                assert set(shown) <= {p.name for p in elpv_cells.glob("*.png")} and len(set(shown)) == N_CELLS
                assert page.locator("#frames-total").text_content() == str(N_CELLS)
                counts = {row.get_attribute("data-grade"): int(row.locator("td.decisions").text_content())
                          for row in page.locator("#counts tbody tr").all()}
                assert counts == {k: int(v) for k, v in decisions.items()}
                assert page.locator("#p50").text_content() != "-"

                # correct the newest frame's decision with one click
                card = cards.first
                decision = card.locator(".decision").text_content().split()[0]
                other = next(b for b in card.locator("button").all() if b.get_attribute("data-label") != decision)
                label = other.get_attribute("data-label")
                labels_before = int(page.locator(f"#counts tr[data-grade='{label}'] td.labels").text_content())
                other.click()
                page.wait_for_function("document.getElementById('corrected').textContent === '1'", timeout=10_000)
                cell = page.locator(f"#counts tr[data-grade='{label}'] td.labels")
                page.wait_for_function(f"document.querySelector(\"#counts tr[data-grade='{label}'] td.labels\").textContent === "
                                       f"'{labels_before + 1}'", timeout=10_000)
                assert int(cell.text_content()) == labels_before + 1
                assert page.locator(".frame.labelled").count() == 1
                assert page.locator(".frame.labelled button.chosen").get_attribute("data-label") == label
            finally:
                browser.close()

        labelled = LabelBook(tmp_path / "labels.csv", list(decisions)).poll()
        assert len(labelled) == 1
        (path, written), = labelled.items()
        assert written == label and Path(path).parent == elpv_cells
        s = samples(get(url + "/metrics")[1].decode())
        assert s[("lineside_station_operator_labels_total", (("verdict", "corrected"),))] == 1
        assert s[("lineside_station_frames_total", ())] == N_CELLS
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, "".join(lines[-40:])
