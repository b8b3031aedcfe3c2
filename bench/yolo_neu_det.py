"""NEU-DET side by side: ultralytics YOLO11n (from ``yolo11n.yaml``) vs lineside, same split, same metric, same budget.

Both fits under one budget (the fair comparison): both processes start together, each on
``--threads`` torch threads, niced, and by default ``--minutes`` counts the CPU minutes of each
fit's process tree (``--budget cpu``), so on a shared, loaded machine both get the same compute::

    PYTHONPATH=/tmp/ultra python bench/yolo_neu_det.py --fit-lineside configs/neu_det.yaml \\
        --budget cpu --minutes 8 --imgsz 200 --threads 2 --out runs/yolo_neu_det_200

A lineside checkpoint trained elsewhere beside a YOLO11n fit (the earlier mode)::

    PYTHONPATH=/tmp/ultra python bench/yolo_neu_det.py [--minutes 12] [--imgsz 192] \\
        [--lineside-ckpt runs/neu_det/checkpoints/best.ckpt] [--out runs/yolo_neu_det]

ultralytics is *not* a lineside dependency and never will be: install it beside the venv, e.g.
``.venv/bin/pip install --target /tmp/ultra --no-deps ultralytics matplotlib contourpy cycler
fonttools kiwisolver pyparsing python-dateutil six polars polars-runtime-32 ultralytics-thop``
(the venv's torch, torchvision, numpy, opencv, pillow, pyyaml, requests, psutil serve it), and
put that folder on ``PYTHONPATH``. It is imported only inside :func:`train_yolo`.

What it does:

1. Splits NEU-DET exactly as ``lineside fit --config configs/neu_det.yaml`` does
   (``DetectionDataModule(dataset="neu_det").prepare_splits()``: stratified by file-prefix
   class, 70/10/20 %, seed 0 → 840/120/240 images) and writes it as a YOLO dataset under
   ``OUT/dataset`` (``images/<split>/`` symlinks to ``../shared/data/neu_det/IMAGES``,
   ``labels/<split>/*.txt`` with ``class cx cy w h`` normalised, ``data.yaml``).
2. Trains YOLO11n from ``yolo11n.yaml`` (random init, no hub weights) on CPU for the same
   wall-clock budget as lineside's fit (ultralytics' ``time=`` argument: it sizes the epoch
   count after the first epoch, validation on the val split included, and keeps ``best.pt`` by
   val fitness as lineside keeps ``best.ckpt`` by val mAP@0.5). Offline: ``YOLO_OFFLINE=1``,
   no auto-install, no plots (no font download), ``amp=False`` (no AMP check download); its
   settings live in ``OUT/ultralytics_config``, not in the user's home.
3. Evaluates ``best.pt`` on the test split with lineside's own :class:`BoxMeanAP` (torchmetrics
   COCO mAP; predictions at ``conf=0.001``, NMS IoU 0.7, at most 100 per image, boxes in image
   pixels against the records' boxes), and prints ultralytics' own ``val(split="test")``
   mAP for reference.
4. With ``--lineside-ckpt``, evaluates that checkpoint on the same test split with the same
   :class:`BoxMeanAP` the way ``lineside test`` does (eval resize, top-K ``BoxDecoder``).
5. With ``--fit-lineside CONFIG`` (instead of 2 in-process and 4), runs two child processes at
   once, each in a session of its own, under ``nice -n --nice``, with ``OMP_NUM_THREADS=--threads``
   and ``OMP_WAIT_POLICY=PASSIVE``: ``lineside fit --config CONFIG --trainer.max_time <minutes>
   --data.init_args.image_size <imgsz> --trainer.default_root_dir OUT/lineside_<imgsz>`` and the
   YOLO11n fit with ``time=<minutes>``. With ``--budget cpu`` (the default here) both budgets
   run on a CPU clock (:func:`use_cpu_clock_for_budgets`: Lightning's ``Timer`` and ultralytics'
   trainer read the CPU seconds of their process tree instead of wall seconds; ultralytics still
   re-plans its epochs and LR schedule from it). It waits for each child with ``os.wait4`` and
   records the wall minutes and the CPU minutes (user + system of the process and its reaped
   children: data-loader workers) each really got, then scores ``best.ckpt`` (kept by val
   mAP@0.5) and ``best.pt`` (kept by val fitness) on the test split. The test split never
   selects anything. ``--skip-yolo`` fits and scores lineside alone (another config at the
   same budget).

Prints one table: tool, input size, torch threads, wall and CPU minutes, epochs, test mAP@0.5,
mAP@0.5:0.95, per-class AP@0.5 and AP@0.5:0.95; writes it as ``OUT/results.json`` too.
ultralytics trains at a multiple of its stride 32 (an ``--imgsz`` of 200 becomes 224; the
table shows the size it used).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from lineside.fusion.detection_datamodule import DetectionDataModule  # noqa: E402
from lineside.fusion.detection_metrics import BoxMeanAP  # noqa: E402
from lineside.vision.box_records import DetectionRecord  # noqa: E402

MAX_DETECTIONS = 100
LINESIDE_CPU_BUDGET = "--lineside-cpu-budget"  # first argument: run ``lineside …`` with CPU-time budgets


def write_yolo_dataset(splits: dict[str, list[DetectionRecord]], class_names: list[str], folder: Path) -> Path:
    """Write ``splits`` as a YOLO dataset (image symlinks + label txt) under ``folder``; return its ``data.yaml``."""
    folder = folder.resolve()
    for split, records in splits.items():
        images, labels = folder / "images" / split, folder / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        for r in records:
            src = Path(r.path).resolve()
            if src.name in seen:
                raise ValueError(f"{src}: two images named {src.name!r} in the {split} split; YOLO needs unique names")
            seen.add(src.name)
            link = images / src.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(src)
            lines = []
            for (x1, y1, x2, y2), c in zip(r.boxes.tolist(), r.labels.tolist()):
                cx, cy = (x1 + x2) / 2 / r.width, (y1 + y2) / 2 / r.height
                w, h = (x2 - x1) / r.width, (y2 - y1) / r.height
                lines.append(f"{int(c)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            (labels / f"{src.stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        for stale in labels.parent.glob(f"{split}.cache"):
            stale.unlink()  # ultralytics' label cache from an earlier split
    data_yaml = folder / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({
        "path": str(folder),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "names": dict(enumerate(class_names)),
    }, sort_keys=False))
    return data_yaml


def _targets(records: list[DetectionRecord]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded (N, M, 4) boxes, (N, M) labels and box mask of ``records`` in image pixels."""
    m = max(1, max(r.num_boxes for r in records))
    boxes = torch.zeros(len(records), m, 4)
    labels = torch.full((len(records), m), -1, dtype=torch.int64)
    mask = torch.zeros(len(records), m, dtype=torch.bool)
    for i, r in enumerate(records):
        k = r.num_boxes
        boxes[i, :k] = torch.as_tensor(r.boxes, dtype=torch.float32)
        labels[i, :k] = torch.as_tensor(r.labels, dtype=torch.int64)
        mask[i, :k] = True
    return boxes, labels, mask


def _pad(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad per-image (k, 4) boxes, (k,) scores, (k,) labels to (N, K, ·) with score -1 / label -1 (never kept)."""
    k = max(1, max(len(s) for _, s, _ in rows))
    boxes = torch.zeros(len(rows), k, 4)
    scores = torch.full((len(rows), k), -1.0)
    labels = torch.full((len(rows), k), -1, dtype=torch.int64)
    for i, (b, s, c) in enumerate(rows):
        boxes[i, : len(s)], scores[i, : len(s)], labels[i, : len(s)] = b, s, c
    return boxes, scores, labels


def _ultralytics_env(out: Path) -> None:
    """Offline, no auto-install, settings under ``out`` (set before ultralytics is imported)."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ.setdefault("YOLO_CONFIG_DIR", str(out / "ultralytics_config"))


def process_tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process, its reaped children and its live descendants
    (data-loader workers): the clock of a CPU-time budget."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.Error:  # exited meanwhile: counted once reaped
            pass
    return total


class _CpuClock:
    """Stands in for the ``time`` module of a trainer's time-budget code: ``monotonic`` / ``time``
    / ``perf_counter`` read the process tree's CPU seconds, the rest is the real ``time``."""

    def __init__(self) -> None:
        self._t0 = time.time() - process_tree_cpu_seconds()  # time()-like values, advancing with CPU use

    def __getattr__(self, name: str):
        return getattr(time, name)

    def monotonic(self) -> float:
        return process_tree_cpu_seconds()

    perf_counter = monotonic

    def time(self) -> float:
        return self._t0 + process_tree_cpu_seconds()


def use_cpu_clock_for_budgets() -> None:
    """Make the fit time budgets (Lightning's ``Timer`` behind ``--trainer.max_time``, ultralytics'
    ``time=``) count CPU seconds of the process tree instead of wall seconds, so two fits on a
    shared, loaded machine get the same compute whatever their share of it. Ultralytics still
    re-plans its epoch count (and LR schedule) from the mean epoch time, now in CPU seconds."""
    import lightning.pytorch.callbacks.timer as lightning_timer

    lightning_timer.time = _CpuClock()
    try:
        import ultralytics.engine.trainer as yolo_trainer
    except ImportError:
        return
    yolo_trainer.time = _CpuClock()


def train_yolo(data_yaml: Path, out: Path, minutes: float, imgsz: int, batch: int, workers: int, seed: int,
               threads: int | None = None, cpu_budget: bool = False) -> dict:
    """Train YOLO11n from ``yolo11n.yaml`` for ``minutes`` of wall time (``cpu_budget``: of CPU time
    of the process tree) on CPU; return its run facts.

    ``threads``: torch CPU threads for YOLO; ``None`` keeps ultralytics' default (CPUs - 1, at
    most 8: one thread on a 2-core machine; its ``select_device`` resets torch to that).
    """
    _ultralytics_env(out)
    try:
        from ultralytics import YOLO, settings
        from ultralytics.utils import torch_utils
    except ImportError as exc:
        raise SystemExit(f"ultralytics is not importable ({exc}); install it outside the venv and put it on PYTHONPATH "
                         "(see this script's docstring)") from None
    settings.update({"sync": False, "clearml": False, "comet": False, "dvc": False, "mlflow": False,
                     "raytune": False, "tensorboard": False, "wandb": False, "datasets_dir": str(out)})
    if threads:
        torch_utils.NUM_THREADS = threads
    if cpu_budget:
        use_cpu_clock_for_budgets()
    model = YOLO("yolo11n.yaml")
    t0 = time.perf_counter()
    model.train(
        data=str(data_yaml), epochs=1000, time=minutes / 60, imgsz=imgsz, batch=batch, device="cpu",
        workers=workers, amp=False, plots=False, pretrained=False, seed=seed, project=str(out),
        name=f"yolo11n_{imgsz}", exist_ok=True, verbose=False,
    )
    train_s = time.perf_counter() - t0
    run = Path(model.trainer.save_dir)
    with open(run / "results.csv", newline="") as f:
        epochs = sum(1 for _ in csv.DictReader(f))
    best = Path(model.trainer.best)
    if not best.is_file():
        best = Path(model.trainer.last)
    return {"YOLO": YOLO, "best": best, "train_minutes": train_s / 60, "epochs": epochs, "run": run,
            "threads": torch.get_num_threads(), "imgsz": int(getattr(model.trainer.args, "imgsz", imgsz))}


@torch.no_grad()
def eval_yolo(YOLO, weights: Path, data_yaml: Path, records: list[DetectionRecord], class_names: list[str],
              imgsz: int, batch: int) -> dict:
    """lineside's BoxMeanAP of ``weights`` on ``records`` (plus ultralytics' own test-split val mAP)."""
    model = YOLO(str(weights))
    metric = BoxMeanAP(class_names, max_detections=MAX_DETECTIONS)
    t0 = time.perf_counter()
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        results = model.predict([r.path for r in chunk], imgsz=imgsz, conf=0.001, iou=0.7, max_det=MAX_DETECTIONS,
                                device="cpu", verbose=False, batch=batch)
        rows = [(res.boxes.xyxy.float().cpu(), res.boxes.conf.float().cpu(), res.boxes.cls.long().cpu()) for res in results]
        metric.update(*_pad(rows), *_targets(chunk))
    out = metric.compute()
    out["predict_s_per_image"] = (time.perf_counter() - t0) / len(records)
    v = model.val(data=str(data_yaml), split="test", imgsz=imgsz, batch=batch, device="cpu", plots=False,
                  verbose=False, save_json=False, project=str(weights.parents[2]), name="test_val", exist_ok=True)
    out["ultralytics_map_50"], out["ultralytics_map"] = float(v.box.map50), float(v.box.map)
    return out


@torch.no_grad()
def eval_lineside(ckpt: Path, root: str | None, class_names: list[str], batch: int, seed: int = 0,
                  limit: int | None = None) -> dict:
    """lineside's BoxMeanAP of a localization checkpoint on the NEU-DET test split, as ``lineside test`` computes it."""
    from lineside.export.checkpoint import load_inspection_model
    from lineside.fusion.box_decoder import BoxDecoder

    loaded = load_inspection_model(ckpt)
    model = loaded.model
    if getattr(model, "localization_head", None) is None:
        raise SystemExit(f"{ckpt}: the model has no localization head")
    names = loaded.box_class_names or class_names
    if names != class_names:
        raise SystemExit(f"{ckpt}: box classes {names} differ from NEU-DET's {class_names}")
    dm = DetectionDataModule(dataset="neu_det", root=root, image_size=loaded.image_size, channels=loaded.channels,
                             batch_size=batch, num_workers=0, seed=seed, limit=limit)
    head = model.localization_head
    stride = head.grid_stride(model.image_encoder) if hasattr(head, "grid_stride") else float(model.image_encoder.strides[head.level_index])
    size = loaded.image_size
    side = -(-size // int(stride))  # heatmap cells per side (ceil)
    cells = model.localization_head.num_classes * side * side
    decoder = BoxDecoder(stride, (size, size), top_k=min(MAX_DETECTIONS, cells))
    metric = BoxMeanAP(names, max_detections=MAX_DETECTIONS)
    n, t0 = 0, time.perf_counter()
    for b in dm.test_dataloader():
        boxes, scores, labels, _ = decoder(model(b["image"]).localization)
        metric.update(boxes, scores, labels, b["boxes"], b["labels"], b["box_mask"])
        n += len(b["image"])
    out = metric.compute()
    out["predict_s_per_image"] = (time.perf_counter() - t0) / n
    out["best_epoch"] = int(torch.load(ckpt, map_location="cpu", weights_only=False).get("epoch", -1)) + 1
    out["image_size"] = size
    out["threads"] = torch.get_num_threads()
    return out


def _format_minutes(minutes: float) -> str:
    """Lightning's ``--trainer.max_time`` ``DD:HH:MM:SS`` for ``minutes``."""
    total = max(1, round(minutes * 60))
    return f"00:{total // 3600:02d}:{total // 60 % 60:02d}:{total % 60:02d}"


def lineside_fit_command(config: str, minutes: float, imgsz: int, root_dir: Path, data_root: str | None = None,
                         seed: int = 0, cpu_budget: bool = False) -> list[str]:
    """The ``lineside fit`` command line of a ``minutes`` fit of ``config`` at ``imgsz`` (wall minutes;
    ``cpu_budget``: CPU minutes of its process tree, through this script's ``--lineside-cpu-budget`` entry)."""
    launcher = [str(Path(__file__).resolve()), LINESIDE_CPU_BUDGET] if cpu_budget else ["-m", "lineside"]
    cmd = [sys.executable, *launcher, "fit", "--config", config, "--trainer.max_time", _format_minutes(minutes),
           "--data.init_args.image_size", str(imgsz), "--trainer.default_root_dir", str(root_dir),
           "--seed_everything", str(seed), "--overwrite", "true"]
    if data_root:
        cmd += ["--data.init_args.root", data_root]
    return cmd


def child_env(threads: int) -> dict[str, str]:
    """Environment of a fit child: ``threads`` OpenMP / MKL threads (torch's intra-op default follows them),
    idle OpenMP threads sleeping rather than spinning (``OMP_WAIT_POLICY=PASSIVE``: on a shared, loaded
    machine spinning threads burn CPU time without progress, which a CPU-time budget would count)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    return env


class Measured:
    """A child process started now and reaped with ``os.wait4``: wall and CPU minutes (user + system,
    its reaped descendants included, e.g. data-loader workers) of that process alone, so two
    children running at once are measured apart."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, nice: int = 0) -> None:
        self.name, self.cmd, self.log = name, cmd, log
        full = (["nice", "-n", str(nice)] if nice else []) + cmd  # nice execs the command: same pid
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "w")
        self._log.write("$ " + shlex.join(full) + "\n")
        self._log.flush()
        self.t0 = time.perf_counter()
        # a session (and process group) of its own: on a shared machine each fit is scheduled as one job
        self.proc = subprocess.Popen(full, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.returncode: int | None = None
        self.wall_minutes = self.cpu_minutes = float("nan")
        self._thread = threading.Thread(target=self._reap, daemon=True)
        self._thread.start()

    def _reap(self) -> None:
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.wall_minutes = (time.perf_counter() - self.t0) / 60
        self.cpu_minutes = (usage.ru_utime + usage.ru_stime) / 60
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # reaped here: Popen must not wait again
        self._log.close()

    def join(self) -> "Measured":
        self._thread.join()
        if self.returncode != 0:
            tail = "".join(self.log.read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(f"{self.name} failed (exit {self.returncode}); log {self.log}:\n{tail}")
        return self


def lineside_epochs(run: Path) -> int:
    """Epochs a lineside fit completed (the epoch index its ``last.ckpt`` was saved at, + 1; a fit that
    ``max_time`` stopped mid-epoch counts the epochs whose checkpoint was written)."""
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise SystemExit(f"{last}: missing; the lineside fit saved no checkpoint (see its fit log beside {run})")
    return int(torch.load(last, map_location="cpu", weights_only=False).get("epoch", -1)) + 1


def fit_both(a: argparse.Namespace, out: Path, data_yaml: Path, names: list[str], test: list[DetectionRecord]) -> list[dict]:
    """Fit lineside (``a.fit_lineside``) and YOLO11n at once under the same wall budget; score both on ``test``."""
    run = out / f"lineside_{a.imgsz}"
    cpu = a.budget == "cpu"
    ls_cmd = lineside_fit_command(a.fit_lineside, a.minutes, a.imgsz, run, a.root, a.seed, cpu)
    yolo_json = out / f"yolo11n_{a.imgsz}.json"
    yolo_cmd = [sys.executable, str(Path(__file__).resolve()), "--yolo-only", str(yolo_json), "--minutes", str(a.minutes),
                "--imgsz", str(a.imgsz), "--batch", str(a.batch), "--workers", str(a.workers), "--seed", str(a.seed),
                "--threads", str(a.threads), "--out", str(out), "--budget", a.budget]
    if a.root:
        yolo_cmd += ["--root", a.root]
    env = child_env(a.threads)
    cmds = [ls_cmd] if a.skip_yolo else [ls_cmd, yolo_cmd]
    print(f"fitting {len(cmds)} for {a.minutes} {a.budget} minutes at once ({a.threads} threads each, nice {a.nice}):\n  "
          + "\n  ".join(shlex.join(c) for c in cmds), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench stops its fits too (below)
    ls_proc = Measured("lineside fit", ls_cmd, env, out / f"lineside_{a.imgsz}.fit.log", a.nice)
    yolo_proc = None if a.skip_yolo else Measured("YOLO11n fit", yolo_cmd, env, out / f"yolo11n_{a.imgsz}.fit.log", a.nice)
    try:
        for m in (ls_proc, yolo_proc):
            if m is not None:
                m.join()
                print(f"{m.name}: {m.wall_minutes:.1f} wall min, {m.cpu_minutes:.1f} CPU min", flush=True)
    except BaseException:  # interrupted or one failed: stop the other fit too
        for m in (ls_proc, yolo_proc):
            if m is not None and m.returncode is None:
                os.killpg(m.proc.pid, 15)
        raise

    torch.set_num_threads(a.threads)
    ls = eval_lineside(run / "checkpoints" / "best.ckpt", a.root, names, a.batch, a.seed, a.limit)
    ls_epochs = lineside_epochs(run)
    tool = "lineside " + Path(a.fit_lineside).stem
    ls_row = {"tool": tool, "imgsz": ls["image_size"], "wall_minutes": ls_proc.wall_minutes, "cpu_minutes": ls_proc.cpu_minutes,
              "epochs": f"{ls_epochs} (best {ls['best_epoch']})", "budget": f"{a.minutes} {a.budget} min",
              "command": shlex.join(ls_cmd), **ls}
    if yolo_proc is None:
        return [ls_row]
    y = json.loads(yolo_json.read_text())
    _ultralytics_env(out)
    from ultralytics import YOLO

    ym = eval_yolo(YOLO, Path(y["best"]), data_yaml, test, names, y["imgsz"], a.batch)
    return [
        ls_row,
        {"tool": "ultralytics YOLO11n (yolo11n.yaml)", "imgsz": y["imgsz"], "wall_minutes": yolo_proc.wall_minutes,
         "cpu_minutes": yolo_proc.cpu_minutes, "epochs": y["epochs"], "threads": y["threads"], "budget": f"{a.minutes} {a.budget} min",
         "command": shlex.join(yolo_cmd), **ym},
    ]


def _cell(v, fmt: str = "{:.1f}") -> str:
    return "?" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)


def table(rows: list[dict], class_names: list[str]) -> str:
    head = ["tool", "input px", "torch threads", "wall min", "CPU min", "epochs", "test mAP@0.5", "mAP@0.5:0.95",
            *[f"AP50 {c}" for c in class_names], *[f"AP {c}" for c in class_names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["tool"], str(r["imgsz"]), str(r.get("threads", "?")), _cell(r.get("wall_minutes", r.get("train_minutes"))),
                 _cell(r.get("cpu_minutes")), str(r["epochs"]), f"{r['map_50']:.3f}", f"{r['map']:.3f}",
                 *[f"{r.get(f'ap_50/{c}', float('nan')):.2f}" for c in class_names],
                 *[f"{r.get(f'ap/{c}', float('nan')):.2f}" for c in class_names]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=12.0, help="wall-clock training budget of each fit")
    p.add_argument("--imgsz", type=int, default=192, help="input side (lineside's NEU-DET config: 192; NEU-DET's native 200)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of each fit (default: ultralytics' CPUs - 1; with --fit-lineside: 2)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="split seed (lineside's default 0) and the fits' seed")
    p.add_argument("--root", default=None, help="NEU-DET folder (default ../shared/data/neu_det beside the repository)")
    p.add_argument("--out", default="runs/yolo_neu_det", help="dataset, runs, logs and results.json go here")
    p.add_argument("--fit-lineside", default=None, metavar="CONFIG",
                   help="also fit lineside from this config, at the same time as YOLO11n and for the same wall minutes")
    p.add_argument("--budget", choices=("wall", "cpu"), default=None,
                   help="what --minutes counts: wall minutes, or CPU minutes of each fit's process tree (the fair budget "
                        "on a shared machine; default with --fit-lineside, wall otherwise)")
    p.add_argument("--skip-yolo", action="store_true", help="with --fit-lineside: fit and score lineside only")
    p.add_argument("--nice", type=int, default=10, help="niceness of the fit processes (--fit-lineside)")
    p.add_argument("--lineside-ckpt", default=None, help="also evaluate this lineside NEU-DET checkpoint")
    p.add_argument("--limit", type=int, default=None, help="keep at most this many images per split (smoke runs)")
    p.add_argument("--lineside-minutes", type=float, default=None, help="that checkpoint's fit wall time, for the table")
    p.add_argument("--lineside-epochs", type=int, default=None, help="that checkpoint's fit epochs, for the table")
    p.add_argument("--yolo-only", default=None, metavar="JSON", help=argparse.SUPPRESS)  # the YOLO child of --fit-lineside
    a = p.parse_args(argv)
    if a.fit_lineside and a.lineside_ckpt:
        p.error("--fit-lineside fits its own checkpoint; leave out --lineside-ckpt")
    if a.fit_lineside and not Path(a.fit_lineside).is_file():
        p.error(f"--fit-lineside {a.fit_lineside}: no such config file")
    if a.fit_lineside and a.threads is None:
        a.threads = 2
    if a.budget is None:
        a.budget = "cpu" if a.fit_lineside else "wall"

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dm = DetectionDataModule(dataset="neu_det", root=a.root, seed=a.seed, limit=a.limit)
    splits = dm.prepare_splits()
    names = dm.class_names
    if a.yolo_only:  # child: train only, the parent scores
        y = train_yolo(out / "dataset" / "data.yaml", out, a.minutes, a.imgsz, a.batch, a.workers, a.seed, a.threads,
                       cpu_budget=a.budget == "cpu")
        Path(a.yolo_only).write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in y.items() if k != "YOLO"}))
        return
    print(f"NEU-DET {dm.source}: " + ", ".join(f"{s} {len(v)}" for s, v in splits.items()), flush=True)
    data_yaml = write_yolo_dataset(splits, names, out / "dataset")
    print(f"YOLO dataset: {data_yaml}", flush=True)

    rows = []
    if a.fit_lineside:
        rows = fit_both(a, out, data_yaml, names, splits["test"])
    else:
        if a.lineside_ckpt:
            ls = eval_lineside(Path(a.lineside_ckpt), a.root, names, a.batch, a.seed, a.limit)
            epochs = f"{a.lineside_epochs or '?'} (best {ls['best_epoch']})"
            rows.append({"tool": "lineside (CenterNet head)", "imgsz": ls["image_size"], "train_minutes": a.lineside_minutes,
                         "epochs": epochs, **ls})
            print(f"lineside {a.lineside_ckpt}: map_50 {ls['map_50']:.3f} map {ls['map']:.3f}", flush=True)
        y = train_yolo(data_yaml, out, a.minutes, a.imgsz, a.batch, a.workers, a.seed, a.threads,
                       cpu_budget=a.budget == "cpu")
        print(f"YOLO11n: {y['epochs']} epochs in {y['train_minutes']:.1f} min, best {y['best']}", flush=True)
        ym = eval_yolo(y["YOLO"], y["best"], data_yaml, splits["test"], names, y["imgsz"], a.batch)
        rows.append({"tool": "ultralytics YOLO11n (yolo11n.yaml)", "imgsz": y["imgsz"], "train_minutes": y["train_minutes"],
                     "epochs": y["epochs"], "threads": y["threads"], **ym})
    yolo_row = next((r for r in rows if "ultralytics_map_50" in r), None)

    print(f"\nNEU-DET test split ({len(splits['test'])} images), lineside BoxMeanAP (torchmetrics COCO mAP); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(table(rows, names))
    if yolo_row:
        print(f"ultralytics' own val on the test split: mAP@0.5 {yolo_row['ultralytics_map_50']:.3f}, "
              f"mAP@0.5:0.95 {yolo_row['ultralytics_map']:.3f}")
    for r in rows:
        print(f"{r['tool']}: inference {1000 * r['predict_s_per_image']:.1f} ms/image (CPU, batch {a.batch})")
    (out / "results.json").write_text(json.dumps({"rows": rows, "class_names": names, "args": vars(a)}, indent=2, default=str))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    if sys.argv[1:2] == [LINESIDE_CPU_BUDGET]:  # the lineside fit child of a CPU-time budget
        use_cpu_clock_for_budgets()
        from lineside.cli import main as lineside_main

        sys.exit(lineside_main(sys.argv[2:]))
    sys.exit(main())
