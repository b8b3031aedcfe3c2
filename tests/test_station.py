"""The line-side station: sources (folder watch, glob, video, GenICam), micro-batching, JSONL records, signals."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest
from PIL import Image

from lineside.runtime import sources as sources_mod
from lineside.runtime import Backend, TorchBackend
from lineside.runtime.sources import (
    FolderSource,
    Frame,
    FrameError,
    GenICamSource,
    GlobSource,
    Source,
    SourceError,
    VideoSource,
    convert_frame,
    convert_genicam,
    open_source,
)
from lineside.runtime.station import JsonlWriter, Station, recorded_paths
from lineside.cli.station import main as station_main

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "tests" / "data" / "pre_namespace_tiny.ckpt"
FIELDS = ["source", "frame", "path", "timestamp", "decision", "grade", "confidence", "probabilities", "latency_ms", "error"]

try:
    import watchdog  # noqa: F401

    HAVE_WATCHDOG = True
except ImportError:
    HAVE_WATCHDOG = False


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    return TorchBackend(CKPT)


def png_bytes(size=(70, 50), mode="L", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, size=(70, 50), mode="L", seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(size, mode, seed))
    return path


def read_records(path: Path) -> list[dict]:
    """Every line must be one complete JSON object."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    assert text == "" or text.endswith("\n"), "last line is torn"
    return [json.loads(line) for line in text.splitlines()]


def assert_graded(rec: dict, class_names: list[str]) -> None:
    assert list(rec)[: len(FIELDS)] == FIELDS
    assert rec["error"] is None
    assert 0 <= rec["grade"] < len(class_names)
    assert rec["decision"] == class_names[rec["grade"]]
    assert list(rec["probabilities"]) == class_names
    probs = list(rec["probabilities"].values())
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-4)
    assert rec["confidence"] == rec["probabilities"][rec["decision"]] == max(probs)
    assert rec["latency_ms"] > 0
    dt.datetime.fromisoformat(rec["timestamp"])


def assert_error(rec: dict, needle: str) -> None:
    assert list(rec)[: len(FIELDS)] == FIELDS
    assert needle in rec["error"]
    assert rec["grade"] is None and rec["decision"] is None and rec["probabilities"] is None
    assert rec["latency_ms"] >= 0


def wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_station(station: Station) -> tuple[threading.Thread, dict]:
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("summary", station.run()), daemon=True)
    t.start()
    return t, box


class FakeBackend(Backend):
    """A backend with the real interface and a controllable speed: probabilities from the mean grey level."""

    name = "fake"

    def __init__(self, delay: float = 0.0, size=(32, 32), fail_on_white: bool = False) -> None:
        super().__init__("<fake>")
        self.metadata = {
            "class_names": ["ok", "mild", "severe"],
            "inputs": [{"name": "image", "dtype": "uint8", "shape": ["N", 1, *size]}],
            "outputs": [
                {"name": "grade_probs", "dtype": "float32", "shape": ["N", 3], "kind": "float"},
                {"name": "grade", "dtype": "int64", "shape": ["N"], "kind": "decoded"},
            ],
        }
        self.delay = delay
        self.fail_on_white = fail_on_white
        self.batches: list[int] = []

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        if self.fail_on_white and (image.reshape(len(image), -1).min(1) == 255).any():
            raise RuntimeError("white frame")
        self.batches.append(len(image))
        time.sleep(self.delay)
        m = image.reshape(len(image), -1).mean(1) / 255.0
        logits = np.stack([1 - m, np.full_like(m, 0.5), m], 1) * 4
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return {"grade_probs": p.astype(np.float32), "grade": p.argmax(1).astype(np.int64)}


class ListSource(Source):
    """Pre-decoded frames, optionally spaced in time, optionally live."""

    def __init__(self, images, every: float = 0.0, live: bool = False, forever: bool = False) -> None:
        super().__init__("list")
        self.images = list(images)
        self.every = every
        self.live = live
        self.forever = forever

    def frames(self, channels, stop):
        for i, im in enumerate(self.images):
            if stop.is_set():
                return
            f = Frame("list", i)
            if isinstance(im, str):
                f.error = im
            else:
                f.image = im
            yield f
            if self.every:
                stop.wait(self.every)
        while self.forever and not stop.wait(0.02):
            pass


def grey(value: int, size=(40, 40)) -> np.ndarray:
    return np.full((*size, 1), value, dtype=np.uint8)


# -- folder sources ----------------------------------------------------------------------------


def test_folder_once_with_a_corrupt_frame(tmp_path, backend, capsys):
    drop = tmp_path / "drop"
    for i, (size, mode) in enumerate([((64, 64), "L"), ((90, 70), "RGB"), ((33, 120), "L"), ((64, 64), "RGB")]):
        write_png(drop / f"cell_{i}.png", size, mode, seed=i)
    write_png(drop / "line2" / "cell_sub.png", seed=9)  # subfolders are watched too
    (drop / "cell_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    (drop / "cell_5.png.tmp").write_bytes(png_bytes(seed=5))  # a temp file, ignored
    (drop / ".cell_6.png").write_bytes(png_bytes(seed=6))  # hidden, ignored
    write_png(drop / ".thumbs" / "cell_7.png")  # hidden folder, ignored
    (drop / "notes.txt").write_text("not an image")  # ignored
    out = tmp_path / "results.jsonl"

    source = FolderSource(drop, once=True, poll=0.02, settle=0.05)
    log = io.StringIO()
    summary = Station(backend, source, out, batch_max=4, latency_budget_ms=20, report_every=0, log=log, warmup=False).run()

    recs = read_records(out)
    by_name = {Path(r["path"]).name: r for r in recs}
    assert sorted(by_name) == ["cell_0.png", "cell_1.png", "cell_2.png", "cell_3.png", "cell_bad.png", "cell_sub.png"]
    assert len(recs) == 6
    for name, rec in by_name.items():
        assert rec["source"] == str(drop)
        if name == "cell_bad.png":
            assert_error(rec, "cell_bad.png: not a readable image")
        else:
            assert_graded(rec, backend.class_names)
    assert sorted(r["frame"] for r in recs) == list(range(6))
    assert (summary.frames, summary.graded, summary.errors, summary.dropped) == (6, 5, 1, 0)
    assert summary.p50_ms > 0 and summary.max_ms >= summary.p99_ms >= summary.p50_ms
    assert 1 <= summary.batches <= 5 and summary.max_batch <= 4
    assert "station summary: 6 frames (5 graded, 1 errors)" in log.getvalue()

    # the CLI over the same folder and results resumes: nothing is recorded twice
    assert recorded_paths(out) == {r["path"] for r in recs}
    rc = station_main(["--model", str(CKPT), "--source", str(drop), "--out", str(out), "--once", "--no-warmup", "--settle-ms", "50"])
    assert rc == 0
    assert len(read_records(out)) == 6
    err = capsys.readouterr().err
    assert "6 files already recorded" in err and "station summary: 0 frames" in err


@pytest.mark.parametrize("watcher", ["polling", "watchdog"])
def test_folder_watch_picks_up_a_file_written_slowly_after_start(tmp_path, backend, monkeypatch, watcher):
    if watcher == "watchdog" and not HAVE_WATCHDOG:
        pytest.skip("watchdog is not installed")
    drop = tmp_path / "drop"
    write_png(drop / "before.png", seed=1)
    out = tmp_path / "r.jsonl"
    reads: list[tuple[str, int]] = []
    real_read = sources_mod.read_image

    def spy(path, channels=1):
        reads.append((os.path.basename(path), os.path.getsize(path)))
        return real_read(path, channels)

    monkeypatch.setattr(sources_mod, "read_image", spy)
    source = FolderSource(drop, poll=0.03, settle=0.4, use_watchdog=watcher == "watchdog")
    assert source.watcher == watcher
    station = Station(backend, source, out, batch_max=4, latency_budget_ms=10, report_every=0, log=io.StringIO(), warmup=False)
    thread, box = start_station(station)
    wait_for(lambda: len(read_records(out)) >= 1, 30, "the file present at start")

    slow = png_bytes((120, 90), "L", seed=2)
    whole = png_bytes((64, 64), "RGB", seed=3)

    def camera() -> None:
        with open(drop / "slow.png", "wb") as fh:  # written in two chunks with a pause between
            fh.write(slow[: len(slow) // 2])
            fh.flush()
            time.sleep(0.15)
            fh.write(slow[len(slow) // 2 :])
        tmp = drop / "renamed.png.tmp"  # written under a temporary name, renamed into place
        tmp.write_bytes(whole)
        os.replace(tmp, drop / "renamed.png")

    cam = threading.Thread(target=camera)
    cam.start()
    cam.join()
    try:
        wait_for(lambda: len(read_records(out)) >= 3, 30, "the two new files")
        time.sleep(0.3)  # nothing more may come
    finally:
        station.stop()
        thread.join(20)
    assert not thread.is_alive()
    recs = read_records(out)
    names = [Path(r["path"]).name for r in recs]
    assert sorted(names) == ["before.png", "renamed.png", "slow.png"]
    for r in recs:
        assert_graded(r, backend.class_names)
    # each file was read once, whole
    assert sorted(reads) == sorted([("before.png", len(png_bytes(seed=1))), ("slow.png", len(slow)), ("renamed.png", len(whole))])
    assert box["summary"].frames == 3 and box["summary"].stopped_by == "stop"


def test_folder_existing_skip_processes_only_new_files(tmp_path):
    drop = tmp_path / "drop"
    write_png(drop / "old.png")
    out = tmp_path / "r.jsonl"
    fake = FakeBackend()
    source = FolderSource(drop, existing="skip", poll=0.02, settle=0.05, use_watchdog=False)
    station = Station(fake, source, out, report_every=0, log=io.StringIO(), warmup=False)
    thread, _ = start_station(station)
    time.sleep(0.3)
    write_png(drop / "new.png", seed=4)
    try:
        wait_for(lambda: len(read_records(out)) >= 1, 20, "the new file")
        time.sleep(0.2)
    finally:
        station.stop()
        thread.join(20)
    assert [Path(r["path"]).name for r in read_records(out)] == ["new.png"]


# -- glob and video ----------------------------------------------------------------------------


def test_glob_source_and_source_errors(tmp_path, backend):
    for i in range(3):
        write_png(tmp_path / f"a{i}.png", seed=i)
    write_png(tmp_path / "b.png")
    src = open_source(str(tmp_path / "a*.png"))
    assert isinstance(src, GlobSource) and len(src.paths) == 3
    out = tmp_path / "r.jsonl"
    s = Station(backend, src, out, batch_max=16, latency_budget_ms=50, report_every=0, log=io.StringIO(), warmup=False).run()
    recs = read_records(out)
    assert [Path(r["path"]).name for r in recs] == ["a0.png", "a1.png", "a2.png"] and s.frames == 3
    for r in recs:
        assert_graded(r, backend.class_names)
    assert isinstance(open_source(str(tmp_path / "b.png")), GlobSource)
    with pytest.raises(SourceError, match="no files match"):
        open_source(str(tmp_path / "zzz*.png"))
    with pytest.raises(SourceError, match="no such folder, file or stream"):
        open_source(str(tmp_path / "missing"))


def write_video(path: Path, n: int, size=(96, 72)) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, size)
    assert writer.isOpened(), "OpenCV here cannot write MJPG .avi"
    for i in range(n):
        frame = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        frame[:, :, 2] = 20 * i  # red in BGR
        frame[10:30, 10 + 3 * i : 40 + 3 * i] = 255
        writer.write(frame)
    writer.release()
    return path


def test_video_file(tmp_path, backend):
    video = write_video(tmp_path / "run.avi", 12)
    src = open_source(str(video))
    assert isinstance(src, VideoSource) and not src.live
    out = tmp_path / "r.jsonl"
    s = Station(backend, src, out, batch_max=5, latency_budget_ms=30, report_every=0, log=io.StringIO(), warmup=False).run()
    recs = read_records(out)
    assert [r["frame"] for r in recs] == list(range(12))
    for r in recs:
        assert_graded(r, backend.class_names)
        assert r["source"] == str(video) and r["path"] is None
    assert s.frames == 12 and s.errors == 0 and s.max_batch <= 5 and s.batches >= 3
    with pytest.raises(SourceError, match="video file not found"):
        VideoSource(str(tmp_path / "none.avi"), live=False)


def test_video_frames_convert_to_the_model_channels(tmp_path):
    video = write_video(tmp_path / "run.avi", 3)
    stop = threading.Event()
    grey_frames = [f.image for f in VideoSource(str(video)).frames(1, stop)]
    rgb_frames = [f.image for f in VideoSource(str(video)).frames(3, stop)]
    assert [f.shape for f in grey_frames] == [(72, 96, 1)] * 3
    assert [f.shape for f in rgb_frames] == [(72, 96, 3)] * 3
    # frame 2 has red 40 in the background: RGB order, not BGR
    assert rgb_frames[2][60, 80, 0] > 25 and rgb_frames[2][60, 80, 2] < 10


def test_convert_frame():
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 200  # blue
    assert convert_frame(bgr, 3, "BGR")[0, 0].tolist() == [0, 0, 200]
    assert convert_frame(bgr, 1, "BGR").shape == (4, 5, 1)
    assert convert_frame(np.full((4, 5), 4095, np.uint16), 1)[0, 0, 0] > 0
    assert convert_frame(np.zeros((4, 5, 4), np.uint8), 3).shape == (4, 5, 3)
    with pytest.raises(FrameError, match="not an image"):
        convert_frame(np.zeros((4, 5, 2), np.uint8), 1)
    with pytest.raises(FrameError, match="no pixels"):
        convert_frame(np.zeros((0, 5), np.uint8), 1)


# -- micro-batching, bad frames, dropping, writer ----------------------------------------------


def test_burst_fills_batches_up_to_batch_max(tmp_path):
    fake = FakeBackend()
    out = tmp_path / "r.jsonl"
    s = Station(fake, ListSource([grey(i) for i in range(40)]), out, batch_max=16, latency_budget_ms=2000, report_every=0, log=io.StringIO(), warmup=False).run()
    assert fake.batches == [16, 16, 8]
    assert s.batches == 3 and s.max_batch == 16 and s.mean_batch == pytest.approx(40 / 3)
    recs = read_records(out)
    assert [r["frame"] for r in recs] == list(range(40))
    for r in recs:
        assert_graded(r, fake.class_names)


def test_zero_budget_runs_frames_as_they_come(tmp_path):
    fake = FakeBackend()
    s = Station(fake, ListSource([grey(9)] * 6, every=0.05), tmp_path / "r.jsonl", batch_max=16, latency_budget_ms=0, report_every=0, log=io.StringIO(), warmup=False).run()
    assert fake.batches == [1] * 6 and s.frames == 6


def test_budget_bounds_the_wait_for_a_batch(tmp_path):
    """Frames every 10 ms, 25 ms budget: batches of a few frames, never the 64 that batch-max allows."""
    fake = FakeBackend(delay=0.002)
    station = Station(fake, ListSource([grey(i) for i in range(40)], every=0.01), tmp_path / "r.jsonl", batch_max=64, latency_budget_ms=25, report_every=0, log=io.StringIO())
    s = station.run()
    assert s.frames == 40 and sum(fake.batches[-s.batches :]) == 40
    assert s.batches >= 4 and s.max_batch < 40
    assert station.timer.expected(1) > 0


def test_bad_frames_become_error_records_and_the_loop_goes_on(tmp_path):
    fake = FakeBackend(fail_on_white=True)
    images = [grey(10), np.zeros((0, 7, 1), np.uint8), grey(255), "decode failed", grey(30)]
    out = tmp_path / "r.jsonl"
    s = Station(fake, ListSource(images), out, batch_max=8, latency_budget_ms=500, report_every=0, log=io.StringIO(), warmup=False).run()
    recs = read_records(out)
    assert [r["frame"] for r in recs] == [0, 1, 2, 3, 4]
    assert_graded(recs[0], fake.class_names)
    assert_error(recs[1], "")
    assert_error(recs[2], "inference failed: RuntimeError: white frame")
    assert_error(recs[3], "decode failed")
    assert_graded(recs[4], fake.class_names)
    assert recs[4]["decision"] == "ok"
    assert (s.frames, s.errors) == (5, 3)


def test_live_source_drops_frames_it_cannot_keep_up_with(tmp_path):
    fake = FakeBackend(delay=0.05)
    out = tmp_path / "r.jsonl"
    s = Station(fake, ListSource([grey(i) for i in range(60)], live=True), out, batch_max=2, queue_size=4, latency_budget_ms=0, report_every=0, log=io.StringIO(), warmup=False).run()
    recs = read_records(out)
    assert len(recs) == 60 and [r["frame"] for r in recs] == sorted(r["frame"] for r in recs)
    dropped = [r for r in recs if r["error"]]
    assert dropped and all("dropped" in r["error"] for r in dropped)
    assert s.dropped == len(dropped) and s.graded == 60 - len(dropped)


def test_stop_finishes_and_reports(tmp_path):
    fake = FakeBackend(delay=0.01)
    log = io.StringIO()
    station = Station(fake, ListSource([grey(i) for i in range(20)], every=0.02, forever=True), tmp_path / "r.jsonl", batch_max=4, latency_budget_ms=20, report_every=0.1, log=log, warmup=False)
    thread, box = start_station(station)
    wait_for(lambda: len(read_records(tmp_path / "r.jsonl")) >= 20, 20, "the 20 frames")
    station.stop("test")
    thread.join(10)
    assert not thread.is_alive()
    s = box["summary"]
    assert s.frames == 20 and s.stopped_by == "test"
    text = log.getvalue()
    assert "frames/s" in text and "p99" in text and "station summary: 20 frames" in text


def test_jsonl_writer_cuts_a_torn_line(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"path": "/a.png", "error": null}\n{"path": "/b.pn')
    w = JsonlWriter(out)
    w.write([{"path": "/c.png"}])
    w.close()
    assert [r["path"] for r in read_records(out)] == ["/a.png", "/c.png"]
    assert recorded_paths(out) == {"/a.png", "/c.png"}


# -- signals -----------------------------------------------------------------------------------


def test_sigterm_finishes_flushes_and_exits_zero(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    out = tmp_path / "r.jsonl"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "lineside", "station", "--model", str(CKPT), "--source", str(drop), "--out", str(out),
           "--poll-ms", "20", "--settle-ms", "60", "--report-every", "0.5", "--batch-max", "4", "--latency-budget-ms", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    written: list[tuple[str, float]] = []
    feeding = threading.Event()
    feeding.set()

    def camera() -> None:
        i = 0
        while feeding.is_set() and i < 2000:
            path = drop / f"f{i:04d}.png"
            tmp = drop / f"f{i:04d}.png.tmp"
            tmp.write_bytes(png_bytes(seed=i))
            os.replace(tmp, path)
            written.append((str(path), time.monotonic()))
            i += 1
            time.sleep(0.08)

    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    feeder = threading.Thread(target=camera, daemon=True)
    try:
        wait_for(lambda: any("warm-up" in line for line in err_lines) or proc.poll() is not None, 120, "the station to start")
        feeder.start()
        wait_for(lambda: (len(written) >= 25 and len(read_records(out)) >= 8) or proc.poll() is not None, 60, "the first records")
        assert proc.poll() is None, "".join(err_lines)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the camera goes on writing meanwhile
        rc = proc.wait(timeout=60)
    finally:
        feeding.clear()
        if feeder.is_alive():
            feeder.join(5)
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    stderr = "".join(err_lines)
    assert rc == 0, stderr
    assert "SIGTERM: finishing the batch in flight" in stderr
    assert "station summary:" in stderr and "stopped by SIGTERM" in stderr
    assert "frames/s" in stderr and "p99" in stderr
    recs = read_records(out)  # every line valid JSON, the last one complete
    paths = [r["path"] for r in recs]
    assert len(paths) == len(set(paths)) >= 8
    for r in recs:
        assert_graded(r, ["ok", "mild", "moderate", "severe"])
    # every file written well before the signal has its record
    before = {p for p, t in written if t < signalled - 1.0}
    assert before and before <= set(paths)
    assert set(paths) <= {p for p, _ in written}
    summary = [line for line in stderr.splitlines() if line.startswith("station summary:")][0]
    assert f"station summary: {len(recs)} frames" in summary


# -- GenICam -----------------------------------------------------------------------------------


def test_genicam_without_a_producer_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GENICAM_GENTL64_PATH", raising=False)
    with pytest.raises(SourceError, match=r"no GenTL producer \(\.cti\) configured; pass --cti .*GENICAM_GENTL64_PATH"):
        open_source("genicam://")
    monkeypatch.setenv("GENICAM_GENTL64_PATH", str(tmp_path))  # a folder without any .cti
    with pytest.raises(SourceError, match="no GenTL producer"):
        open_source("genicam://1234")
    with pytest.raises(SourceError, match="not a .cti GenTL producer"):
        open_source("genicam://", cti=str(tmp_path / "missing.cti"))
    # and from the command line: exit 2 with the message, before any model is loaded
    rc = station_main(["--model", str(tmp_path / "no_model.onnx"), "--source", "genicam://", "--out", str(tmp_path / "r.jsonl")])
    assert rc == 2
    assert "lineside station: error: GenICam source: no GenTL producer" in capsys.readouterr().err


def test_genicam_without_harvesters_says_how_to_install(tmp_path, monkeypatch):
    cti = tmp_path / "producer.cti"
    cti.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "harvesters", None)
    monkeypatch.setitem(sys.modules, "harvesters.core", None)
    with pytest.raises(SourceError, match=r"needs the optional 'harvesters' package.*pip install 'lineside\[camera\]'"):
        open_source("genicam://", cti=str(cti))


def fake_harvesters(monkeypatch, buffers):
    """A stand-in for harvesters.core with two cameras; the second delivers ``buffers``, then nothing."""
    calls: list[str] = []

    class Component:
        def __init__(self, data, width, height, fmt):
            self.data, self.width, self.height, self.data_format = data, width, height, fmt

    class Buffer:
        def __init__(self, component):
            self.payload = types.SimpleNamespace(components=[component])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            calls.append("queue")

    class Acquirer:
        def __init__(self):
            self.left = [Buffer(Component(*b)) for b in buffers]

        def start(self):
            calls.append("start")

        def try_fetch(self, timeout):
            if self.left:
                return self.left.pop(0)
            time.sleep(min(timeout, 0.01))
            return None

        def stop(self):
            calls.append("stop")

        def destroy(self):
            calls.append("destroy")

    class Harvester:
        def __init__(self):
            self.device_info_list = []

        def add_file(self, path):
            calls.append(f"add_file {Path(path).name}")

        def update(self):
            self.device_info_list = [
                types.SimpleNamespace(serial_number="SN1", vendor="Acme", model="Cam A"),
                types.SimpleNamespace(serial_number="SN2", vendor="Acme", model="Cam B"),
            ]

        def create(self, device):
            calls.append(f"create {device.serial_number}")
            return Acquirer()

        def reset(self):
            calls.append("reset")

    module = types.ModuleType("harvesters.core")
    module.Harvester = Harvester
    monkeypatch.setitem(sys.modules, "harvesters", types.ModuleType("harvesters"))
    monkeypatch.setitem(sys.modules, "harvesters.core", module)
    return calls


def test_genicam_camera_through_the_station(tmp_path, monkeypatch, backend):
    cti = tmp_path / "producer.cti"
    cti.write_bytes(b"")
    monkeypatch.setenv("GENICAM_GENTL64_PATH", str(tmp_path))
    w, h = 80, 60
    rng = np.random.default_rng(0)
    buffers = [
        (rng.integers(0, 255, w * h, dtype=np.uint8), w, h, "Mono8"),
        (rng.integers(0, 4095, w * h, dtype=np.uint16), w, h, "Mono12"),
        (rng.integers(0, 255, w * h, dtype=np.uint8), w, h, "BayerRG8"),
        (np.zeros(w * h * 2, np.uint8), w, h, "YCbCr422_8"),
        (np.zeros(10, np.uint8), w, h, "Mono8"),
    ]
    calls = fake_harvesters(monkeypatch, buffers)
    with pytest.raises(SourceError, match=r"no camera with serial SN9 \(found: SN1, SN2\)"):
        open_source("genicam://SN9")
    calls.clear()
    src = open_source("genicam://SN2")
    assert isinstance(src, GenICamSource) and src.live and "SN2" in src.describe()
    out = tmp_path / "r.jsonl"
    station = Station(backend, src, out, batch_max=4, latency_budget_ms=20, report_every=0, log=io.StringIO(), warmup=False)
    thread, box = start_station(station)
    try:
        wait_for(lambda: len(read_records(out)) >= 5, 30, "the five camera frames")
    finally:
        station.stop()
        thread.join(20)
    recs = read_records(out)
    assert [r["frame"] for r in recs] == [0, 1, 2, 3, 4]
    for r in recs[:3]:
        assert_graded(r, backend.class_names)
        assert r["source"] == "genicam://SN2" and r["path"] is None
    assert_error(recs[3], "pixel format YCbCr422_8 is not supported")
    assert_error(recs[4], "buffer holds 10 values")
    assert calls[:3] == ["add_file producer.cti", "create SN2", "start"]
    assert calls.count("queue") == 5 and calls[-3:] == ["stop", "destroy", "reset"]
    assert box["summary"].frames == 5


def test_convert_genicam_bayer_and_depths():
    raw = np.zeros((8, 8), np.uint8)
    raw[0::2, 0::2] = 255  # RGGB: red photosites
    rgb = convert_genicam(raw.reshape(-1), 8, 8, "BayerRG8", 3)
    assert rgb.shape == (8, 8, 3) and rgb[4, 4].tolist() == [255, 0, 0]
    mono12 = np.full(16, 4095, np.uint16)
    assert convert_genicam(mono12.view(np.uint8), 4, 4, "Mono12", 1).tolist() == np.full((4, 4, 1), 255).tolist()
    bgr = np.tile(np.array([255, 0, 0], np.uint8), 4)
    assert convert_genicam(bgr, 2, 2, "BGR8", 3)[0, 0].tolist() == [0, 0, 255]
    with pytest.raises(FrameError, match="not supported"):
        convert_genicam(raw, 8, 8, "Mono10p", 1)
