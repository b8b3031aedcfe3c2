"""bench/yolo_neu_det.py's budget plumbing: the lineside fit command, CPU-time budgets (the clock
Lightning's ``Timer`` then reads) and per-process CPU accounting of two fits run at once. No
ultralytics and no data needed."""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest

from conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("yolo_neu_det", REPO / "bench" / "yolo_neu_det.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_lineside_fit_command_sets_budget_size_and_run_folder(tmp_path) -> None:
    bench = _bench()
    assert bench._format_minutes(10) == "00:00:10:00" and bench._format_minutes(90.5) == "00:01:30:30"
    cmd = bench.lineside_fit_command("configs/neu_det.yaml", 7.5, 320, tmp_path / "run", "/data/neu", seed=3)
    assert cmd[1:4] == ["-m", "lineside", "fit"]
    pairs = dict(zip(cmd[4::2], cmd[5::2]))
    assert pairs["--config"] == "configs/neu_det.yaml" and pairs["--trainer.max_time"] == "00:00:07:30"
    assert pairs["--data.init_args.image_size"] == "320" and pairs["--trainer.default_root_dir"] == str(tmp_path / "run")
    assert pairs["--data.init_args.root"] == "/data/neu" and pairs["--seed_everything"] == "3"
    cpu = bench.lineside_fit_command("configs/neu_det.yaml", 7.5, 320, tmp_path / "run", cpu_budget=True)
    assert cpu[1:4] == [str(REPO / "bench" / "yolo_neu_det.py"), bench.LINESIDE_CPU_BUDGET, "fit"]
    assert "--data.init_args.root" not in cpu


def test_cpu_clock_advances_with_cpu_not_with_sleep() -> None:
    bench = _bench()
    clock = bench._CpuClock()
    t0, w0 = clock.monotonic(), clock.time()
    time.sleep(0.3)
    assert clock.monotonic() - t0 < 0.15  # sleeping uses no CPU
    _burn(0.3)
    assert 0.25 < clock.monotonic() - t0 < 1.0 and 0.25 < clock.time() - w0 < 1.0
    assert clock.sleep is time.sleep  # everything else is the real time module


def test_lightning_timer_reads_the_cpu_clock(monkeypatch) -> None:
    import lightning.pytorch.callbacks.timer as lightning_timer

    bench = _bench()
    monkeypatch.setattr(lightning_timer, "time", lightning_timer.time)  # restored after the test
    bench.use_cpu_clock_for_budgets()
    assert isinstance(lightning_timer.time, bench._CpuClock)
    timer = lightning_timer.Timer(duration="00:00:00:01")
    timer.on_train_start(None, None)
    time.sleep(0.3)
    assert timer.time_elapsed() < 0.15
    _burn(0.3)
    assert timer.time_elapsed() >= 0.25


def test_two_children_at_once_are_measured_apart(tmp_path) -> None:
    bench = _bench()
    busy = [sys.executable, "-c", "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass"]
    idle = [sys.executable, "-c", "import time; time.sleep(0.6)"]
    a = bench.Measured("busy", busy, {}, tmp_path / "busy.log")
    b = bench.Measured("idle", idle, {}, tmp_path / "idle.log", nice=5)
    a.join(), b.join()
    assert a.cpu_minutes * 60 >= 0.55 and b.cpu_minutes * 60 < 0.3  # the interpreter start is a few tens of ms
    assert b.wall_minutes * 60 >= 0.55
    assert (tmp_path / "idle.log").read_text().startswith("$ nice -n 5 ")
    failing = bench.Measured("failing", [sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "f.log")
    with pytest.raises(SystemExit, match="exit 3"):
        failing.join()
