"""A/B shadow switching at the station: both models on every frame, operator labels, promotion."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest
from PIL import Image

from lineside.cli.station import main as station_main
from lineside.runtime import Backend
from lineside.runtime.shadow import LabelBook, ShadowTracker
from lineside.runtime.sources import Frame, GlobSource, Source
from lineside.runtime.station import Station

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "tests" / "data" / "pre_namespace_tiny.ckpt"
CLASSES = ["ok", "bad"]


class ThresholdBackend(Backend):
    """Scripted: "bad" when the frame's grey level is at least ``threshold``, else "ok"."""

    name = "threshold"

    def __init__(self, threshold: int, size=(16, 16), channels: int = 1) -> None:
        super().__init__(f"<threshold {threshold}>")
        self.threshold = threshold
        self.metadata = {
            "class_names": list(CLASSES),
            "inputs": [{"name": "image", "dtype": "uint8", "shape": ["N", channels, *size]}],
            "outputs": [
                {"name": "grade_probs", "dtype": "float32", "shape": ["N", 2], "kind": "float"},
                {"name": "grade", "dtype": "int64", "shape": ["N"], "kind": "decoded"},
            ],
        }
        self.calls = 0

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        self.calls += 1
        bad = image.reshape(len(image), -1).mean(1) >= self.threshold
        p = np.where(bad[:, None], [[0.1, 0.9]], [[0.8, 0.2]]).astype(np.float32)
        return {"grade_probs": p, "grade": bad.astype(np.int64)}


# the truth: "bad" from grey level 100 up. A (threshold 200) misses 100…199, B (threshold 100) is always right.
LEVELS = [10, 150, 220, 30, 120, 180, 250, 60, 160, 140, 90, 210, 170, 20, 130, 240, 110, 50, 190, 70]


def truth(level: int) -> str:
    return "bad" if level >= 100 else "ok"


def write_frames(folder: Path, levels=LEVELS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, v in enumerate(levels):
        p = folder / f"f{i:03d}.png"
        Image.fromarray(np.full((20, 24), v, np.uint8), "L").save(p)
        paths.append(p)
    return paths


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shadow_runs_both_and_promotes_once_with_the_right_counts(tmp_path):
    paths = write_frames(tmp_path / "frames")
    labelled = {p: truth(v) for p, v in zip(paths, LEVELS) if int(p.stem[1:]) % 2 == 0 or int(p.stem[1:]) > 12}
    labels = tmp_path / "labels.csv"
    # a header, class names and indices, a path relative to the CSV's folder, a label that is no class
    rows = ["path,label"] + [f"{os.path.relpath(p, tmp_path) if i % 3 else p},{lab if i % 2 else CLASSES.index(lab)}"
                             for i, (p, lab) in enumerate(labelled.items())] + [f"{tmp_path}/elsewhere.png,purple"]
    labels.write_text("\n".join(rows) + "\n")
    a, b = ThresholdBackend(200), ThresholdBackend(100)
    out, log = tmp_path / "r.jsonl", io.StringIO()
    station = Station(a, GlobSource(str(tmp_path / "frames" / "*.png")), out, batch_max=1, latency_budget_ms=0, report_every=0,
                      log=log, warmup=False, shadow=b, labels=labels, promote_after=5, margin=0.3, status_every=0,
                      model_names=("a.onnx", "b.onnx"))
    summary = station.run()
    lines = read_lines(out)

    frames = [r for r in lines if "event" not in r]
    assert summary.frames == len(frames) == len(LEVELS)
    assert sorted(Path(r["path"]).name for r in frames) == [p.name for p in paths]  # every frame exactly once
    promotes = [i for i, r in enumerate(lines) if r.get("event") == "promote"]
    assert len(promotes) == 1
    cut = promotes[0]
    level = {str(p): v for p, v in zip(paths, LEVELS)}
    for i, r in enumerate(lines):
        if "event" in r:
            continue
        v = level[r["path"]]
        a_dec, b_dec = ("bad" if v >= 200 else "ok"), ("bad" if v >= 100 else "ok")
        if i < cut:  # A on the line, B in the shadow
            assert (r["active"], r["model"], r["decision"], r["grade"]) == ("A", "a.onnx", a_dec, CLASSES.index(a_dec))
            assert r["shadow"] == {"model": "b.onnx", "decision": b_dec, "grade": CLASSES.index(b_dec), "confidence": 0.9 if b_dec == "bad" else 0.8}
        else:  # B on the line from the next batch, A in the shadow
            assert (r["active"], r["model"], r["decision"]) == ("B", "b.onnx", b_dec)
            assert (r["shadow"]["model"], r["shadow"]["decision"]) == ("a.onnx", a_dec)
        assert r["confidence"] == pytest.approx(0.9 if r["decision"] == "bad" else 0.8)

    # the counts in the promote record: the labelled frames before it, the last 5 of them compared
    before = [r for r in lines[:cut] if "event" not in r and Path(r["path"]) in labelled]
    last = before[-5:]
    correct_a = sum(r["decision"] == labelled[Path(r["path"])] for r in last)
    correct_b = sum(r["shadow"]["decision"] == labelled[Path(r["path"])] for r in last)
    p = lines[cut]
    assert (p["active"], p["model"], p["previous"], p["previous_model"], p["window"]) == ("B", "b.onnx", "A", "a.onnx", 5)
    assert p["labelled"] == len(before) and p["frames"] == cut - sum("event" in r for r in lines[:cut])
    assert p["correct"] == {"A": correct_a, "B": correct_b} and correct_b == 5
    assert p["accuracy"]["B"] - p["accuracy"]["A"] >= 0.3
    # the first point where B led by 0.3 over 5 labels: one label fewer and it would not have switched
    fewer = before[:-1][-5:]
    assert len(before) == 5 or sum(r["decision"] == labelled[Path(r["path"])] for r in fewer) > 2
    assert lines[cut + 1]["event"] == "station_status"

    final = lines[-1]
    assert final["event"] == "station_status" and final["active"] == "B" and final["switches"] == 1
    assert final["labelled"] == len(labelled) and final["frames"] == len(LEVELS)
    assert final["correct"]["B"] == len(labelled)
    assert final["correct"]["A"] == sum(("bad" if level[str(q)] >= 200 else "ok") == lab for q, lab in labelled.items())
    agree = sum(("bad" if v >= 200 else "ok") == truth(v) for v in LEVELS)
    assert final["agreed"] == agree and final["compared"] == len(LEVELS)
    assert "purple" in log.getvalue() and "promoted B (b.onnx)" in log.getvalue()


class PathSource(Source):
    """Frames with paths, then waits (a camera drop folder that went quiet) until stopped."""

    def __init__(self, paths, levels) -> None:
        super().__init__("paths")
        self.items = list(zip(paths, levels))

    def frames(self, channels, stop):
        for i, (p, v) in enumerate(self.items):
            f = Frame("paths", i, str(p))
            f.image = np.full((20, 24, 1), v, np.uint8)
            yield f
        while not stop.wait(0.02):
            pass


def test_late_labels_are_counted_and_can_promote(tmp_path):
    paths = [tmp_path / f"c{i}.png" for i in range(len(LEVELS))]  # only names: labels match on the path
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    a, b = ThresholdBackend(200), ThresholdBackend(100)
    out = tmp_path / "r.jsonl"
    station = Station(a, PathSource(paths, LEVELS), out, batch_max=4, latency_budget_ms=0, report_every=0, log=io.StringIO(),
                      warmup=False, shadow=b, labels=labels_dir, promote_after=8, margin=0.25, status_every=10)
    t = threading.Thread(target=station.run, daemon=True)
    t.start()
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end and station.shadow_tracker.frames < len(LEVELS):
            time.sleep(0.02)
        assert station.shadow_tracker.frames == len(LEVELS) and station.shadow_tracker.labelled == 0
        # the operator's labels come afterwards, in two files
        (labels_dir / "one.csv").write_text("".join(f"{p},{truth(v)}\n" for p, v in list(zip(paths, LEVELS))[:6]))
        (labels_dir / "two.csv").write_text("".join(f"{p},{CLASSES.index(truth(v))}\n" for p, v in list(zip(paths, LEVELS))[6:]))
        while time.monotonic() < end and station.shadow_tracker.labelled < len(LEVELS):
            time.sleep(0.02)
    finally:
        station.stop()
        t.join(10)
    assert not t.is_alive()
    lines = read_lines(out)
    frames = [r for r in lines if "event" not in r]
    assert len(frames) == len(LEVELS) and all(r["active"] == "A" for r in frames)
    statuses = [r for r in lines if r.get("event") == "station_status"]
    # every 10 frames: after the batch (of at most 4) that passes 10, then the one that ends at 20
    assert 10 <= statuses[0]["frames"] <= 13 and statuses[1]["frames"] == 20
    promotes = [r for r in lines if r.get("event") == "promote"]
    assert len(promotes) == 1 and promotes[0]["active"] == "B"  # late labels: no new frame needed to switch
    final = statuses[-1]
    assert final["labelled"] == len(LEVELS) and final["correct"]["B"] == len(LEVELS)
    assert final["correct"]["A"] == sum(("bad" if v >= 200 else "ok") == truth(v) for v in LEVELS)
    assert final["active"] == "B" and final["awaiting_labels"] == 0


def test_tracker_keeps_a_bounded_memory_and_switches_at_most_once_per_window():
    t = ShadowTracker({"A": "a", "B": "b"}, promote_after=4, margin=0.5, keep=3)
    for i in range(5):
        t.observe(f"/x/{i}.png", {"A": "ok", "B": "bad"})
    assert len(t.pending) == 3  # the two oldest fell out
    t.add_labels({os.path.abspath(f"/x/{i}.png"): "bad" for i in range(5)})
    assert t.labelled == 3 and t.maybe_promote() is None  # 3 < 4 labels
    t.observe("/x/5.png", {"A": "ok", "B": "bad"})
    t.add_labels({os.path.abspath("/x/5.png"): "bad"})
    assert t.maybe_promote()["active"] == "B" and t.maybe_promote() is None
    for i in range(6, 9):  # A now right, B wrong, but only 3 labels since the switch
        t.observe(f"/x/{i}.png", {"A": "bad", "B": "ok"})
        t.add_labels({os.path.abspath(f"/x/{i}.png"): "bad"})
    assert t.maybe_promote() is None
    t.observe("/x/9.png", {"A": "bad", "B": "ok"})
    t.add_labels({os.path.abspath("/x/9.png"): "bad"})
    assert t.maybe_promote()["active"] == "A" and t.switches == 2


def test_shadow_must_take_the_same_inputs_and_classes(tmp_path):
    write_frames(tmp_path / "f", [1])
    src = GlobSource(str(tmp_path / "f" / "*.png"))
    with pytest.raises(ValueError, match="same inputs"):
        Station(ThresholdBackend(1), src, tmp_path / "r.jsonl", shadow=ThresholdBackend(1, size=(32, 32)), warmup=False)
    other = ThresholdBackend(1)
    other.metadata["class_names"] = ["good", "scrap"]
    with pytest.raises(ValueError, match="same classes"):
        Station(ThresholdBackend(1), src, tmp_path / "r.jsonl", shadow=other, warmup=False)
    with pytest.raises(ValueError, match="shadow"):
        Station(ThresholdBackend(1), src, tmp_path / "r.jsonl", labels=tmp_path, warmup=False)
    with pytest.raises(ValueError, match="no such"):
        LabelBook(tmp_path / "missing.csv", CLASSES)


def test_cli_station_once_with_a_shadow_checkpoint(tmp_path, capsys):
    paths = write_frames(tmp_path / "drop", LEVELS[:4])
    (tmp_path / "labels.csv").write_text("".join(f"{p},0\n" for p in paths))
    out = tmp_path / "r.jsonl"
    rc = station_main(["--model", str(CKPT), "--shadow", str(CKPT), "--source", str(tmp_path / "drop"), "--out", str(out), "--once",
                       "--no-warmup", "--settle-ms", "50", "--labels", str(tmp_path / "labels.csv"), "--promote-after", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = read_lines(out)
    frames = [r for r in lines if "event" not in r]
    assert len(frames) == 4
    for r in frames:  # the same model twice: always agree, never switch
        assert r["active"] == "A" and r["model"] == str(CKPT) and r["shadow"]["model"] == str(CKPT)
        assert r["shadow"]["decision"] == r["decision"] and r["shadow"]["grade"] == r["grade"]
    final = lines[-1]
    assert final["event"] == "station_status" and final["labelled"] == 4 and final["agreement"] == 1.0 and final["switches"] == 0
    assert "shadow" in err and "agreement 100.0 %" in err
    with pytest.raises(SystemExit):  # labels without a shadow
        station_main(["--model", str(CKPT), "--source", str(tmp_path / "drop"), "--out", str(out), "--labels", "x.csv"])


class FailingOnWhite(ThresholdBackend):
    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        if (image.reshape(len(image), -1).min(1) == 255).any():
            raise RuntimeError("white frame")
        return super()._run(image)


def test_a_shadow_failure_never_touches_the_line(tmp_path):
    write_frames(tmp_path / "f", [10, 255, 220])
    out = tmp_path / "r.jsonl"
    s = Station(ThresholdBackend(200), GlobSource(str(tmp_path / "f" / "*.png")), out, batch_max=4, latency_budget_ms=500,
                report_every=0, log=io.StringIO(), warmup=False, shadow=FailingOnWhite(100))
    assert s.run().errors == 0
    frames = [r for r in read_lines(out) if "event" not in r]
    assert [(r["error"], r["decision"]) for r in frames] == [(None, "ok"), (None, "bad"), (None, "bad")]
    assert [r["shadow"]["decision"] for r in frames] == ["ok", None, "bad"]
    assert "white frame" in frames[1]["shadow"]["error"] and "error" not in frames[0]["shadow"]
    final = read_lines(out)[-1]
    assert final["event"] == "station_status" and (final["compared"], final["agreed"], final["frames"]) == (2, 2, 3)
