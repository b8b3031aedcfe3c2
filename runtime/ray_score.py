"""Batch scoring on a Ray cluster: ``lineside score … --engine ray``, the rows of ``lineside score`` at cluster scale.

    lineside score --model export/el/model.onnx --input /data/cells --output scores.parquet --engine ray --actors 4
    lineside score --model best.ckpt --input cells.csv --output scores.csv --engine ray --address auto
    lineside score --model model.engine --input /data/cells --output s.parquet --engine ray --address ray://head:10001 \\
        --actors 2 --gpus-per-actor 1

The pipeline is a Ray Dataset of paths → decoding in ``map_batches`` tasks (the decode of
:class:`~lineside.vision.image_dataset.ScoringImageDataset`, the resize every path shares) →
one pool of ``--actors`` actors, each holding the model once, that run the backend and turn its
outputs into rows with :class:`~lineside.runtime.records.RecordBuilder` and
:func:`~lineside.runtime.records.score_row` → the results journal of :mod:`~lineside.runtime.results`
on the driver. A file therefore gets exactly the row ``lineside score`` gives it: the same
columns, the same values, error rows for files that cannot be decoded (``path``, ``error``, the
other columns empty) and ``inference failed: …`` rows for a file the backend rejects.

There is one actor class per backend (:data:`SCORERS`): :class:`OnnxRuntimeScorer` (CPUs, or a
GPU with onnxruntime-gpu; its intra-op threads follow ``--cpus-per-actor``),
:class:`TorchScorer` (a checkpoint; eager torch on a GPU, or on CPUs),
:class:`TensorRTScorer` (``.engine`` on a GPU) and :class:`AotiScorer` (``.pt2``). Each opens the
artefact as ``lineside score`` does (:func:`~lineside.runtime.open_model.open_model` /
:func:`~lineside.runtime.backend.load_backend`). A checkpoint scored on CPUs is exported once to
ONNX on the driver (the cached, parity-checked export of ``lineside score``) and the actors run
that file; with ``--gpus-per-actor`` the actors load the checkpoint in eager torch on their GPU.

**Row order.** Rows are written in input order (the sorted order of ``collect_inputs``, or the
manifest's order), the order of the single-process scorer: the Dataset runs with
``preserve_order``, so actors may finish batches out of order but the driver writes them in
order. On a resumed run the rows already in the output come first, then the new ones in input
order. **Resume.** Rows are appended (and fsync'ed) to the CSV output (or to
``<output>.partial.csv`` for Parquet, assembled atomically at the end) as each batch reaches the
driver; a re-run skips every path already in the output, and ``--retry-errors`` scores the
error rows again.

**Where.** Without ``--address`` a local Ray instance is started for the run (all cores; temp
files under ``$TMPDIR/ray-lineside``) and stopped after it; with ``--address auto`` or
``ray://host:10001`` the job joins that cluster. Model, inputs and output are opened by path on
the actors and the driver: on a cluster they must be on storage every node mounts at the same
path (NFS, a CSI volume under KubeRay).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lineside.runtime.backend import Backend, backend_for, load_backend
from lineside.runtime.detections import BOX_SCORE_THRESHOLD
from lineside.runtime.open_model import open_model
from lineside.runtime.records import RecordBuilder, score_row
from lineside.runtime.results import ScoreSummary, finalise_parquet, open_journal
from lineside.vision.io import InputError, collect_inputs

__all__ = ["SCORERS", "RayScoreSummary", "plan_model", "OnnxRuntimeScorer", "TorchScorer", "TensorRTScorer", "AotiScorer", "decode_batch", "import_ray", "ray_session",
           "score_on_ray"]

log = logging.getLogger("lineside.ray")

DECODE_CPUS = 0.5  # logical CPUs a decoding task asks for; the actors get what is left on a small cluster

RAY_MISSING = "Ray is not installed: pip install 'lineside[plant]' (brings ray[data,serve])"


def import_ray():
    """``ray``, or an :class:`ImportError` that names the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"{RAY_MISSING} ({exc})") from exc
    return ray


class ray_session:  # noqa: N801 - used as a context manager like open()
    """Connect to Ray for one job: ``address`` (``auto``, ``ray://host:10001``, ``host:6379``) joins a cluster,
    None starts a local instance (``num_cpus``: default all cores); an already initialised Ray is used
    as it is and left running. The instance started here is shut down on exit."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address, self.num_cpus, self.started = address, num_cpus, False

    def __enter__(self):
        ray = import_ray()
        if ray.is_initialized():
            return ray
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if self.address:
            ray.init(address=self.address, **kwargs)
        else:
            temp = Path(tempfile.gettempdir()) / "ray-lineside"
            ray.init(num_cpus=self.num_cpus, _temp_dir=str(temp), **kwargs)
        self.started = True
        return ray

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            import ray

            ray.shutdown()


# -------------------------------------------------------------------------------------------
# decoding (map_batches tasks)


def decode_batch(batch: dict[str, np.ndarray], size: tuple[int, int], channels: int) -> dict[str, np.ndarray]:
    """A batch of ``path`` (and ``index``) → ``image`` (N, C, H, W) uint8 at the model's frame size, ``error``
    (empty when decoded), ``height`` / ``width`` (the file's own size, to map boxes back); the decode of
    ``lineside score`` (:class:`~lineside.vision.image_dataset.ScoringImageDataset`), a bad file an error, never an exception."""
    from lineside.vision.image_dataset import ScoringImageDataset

    paths = [str(p) for p in batch["path"]]
    dataset = ScoringImageDataset(paths, size, channels)
    items = [dataset[i] for i in range(len(paths))]
    return {
        "index": np.asarray(batch["index"]),
        "path": np.asarray(paths, dtype=object),
        "image": np.stack([it["image"].numpy() for it in items]) if items else np.zeros((0, channels, *size), np.uint8),
        "error": np.asarray([it["error"] for it in items], dtype=object),
        "height": np.asarray([it["size"][0] for it in items], dtype=np.int64),
        "width": np.asarray([it["size"][1] for it in items], dtype=np.int64),
    }


# -------------------------------------------------------------------------------------------
# the actors: one class per backend, each holds the model once


class _Scorer:
    """A Ray Data actor (a callable class for ``map_batches``): opens the model once, then decoded batches → rows.

    ``spec``: ``model``, ``backend``, ``device``, ``threads``, ``box_threshold``, ``columns`` and, for
    checkpoints, ``input_size`` / ``tta`` / ``text`` / ``trust_checkpoint``. Each row comes back as
    JSON (``row``) beside its input ``index``.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.runner = self.open(spec)
        self.records = RecordBuilder(self.runner, spec["box_threshold"])
        self.class_names = self.runner.class_names
        self.columns = spec["columns"]

    @staticmethod
    def open(spec: dict[str, Any]) -> Backend:
        """The backend of ``spec`` (also what a Ray Serve replica runs, :mod:`lineside.runtime.serve`)."""
        return open_model(spec["model"], spec["backend"], spec["device"], spec.get("input_size"), spec.get("tta"), spec.get("text"),
                          trust_checkpoint=spec.get("trust_checkpoint", False))

    def _rows(self, images: np.ndarray, paths: list[str], sizes: list[tuple[int, int]]) -> list[dict]:
        out = self.runner(images)
        return [{"path": p, "error": ""} | score_row(self.records.record(out, j, sizes[j]), self.class_names) for j, p in enumerate(paths)]

    def _run_good(self, images: np.ndarray, paths: list[str], sizes: list[tuple[int, int]]) -> list[dict]:
        """Rows of decoded images; a batch the backend rejects is run image by image, so one bad input only fails itself."""
        try:
            return self._rows(images, paths, sizes)
        except Exception as exc:  # noqa: BLE001 - isolate the input that broke it
            if len(paths) == 1:
                return [self._error(paths[0], f"{paths[0]}: inference failed: {type(exc).__name__}: {str(exc)[:500]}")]
        return [row for i in range(len(paths)) for row in self._run_good(images[i : i + 1], paths[i : i + 1], sizes[i : i + 1])]

    def _error(self, path: str, error: str) -> dict:
        return {c: "" for c in self.columns} | {"path": path, "error": error}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        paths = [str(p) for p in batch["path"]]
        errors = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in errors], dtype=bool)
        sizes = [(int(h), int(w)) for h, w in zip(batch["height"], batch["width"])]
        good = iter(self._run_good(batch["image"][ok], [p for p, k in zip(paths, ok) if k], [s for s, k in zip(sizes, ok) if k])
                    if ok.any() else [])
        rows = [next(good) if k else self._error(p, e) for p, e, k in zip(paths, errors, ok)]
        busy = (time.perf_counter() - start) / max(1, len(rows))  # the actor's seconds, spread over the batch's rows
        return {"index": np.asarray(batch["index"]), "row": np.asarray([json.dumps(r) for r in rows], dtype=object),
                "actor_seconds": np.full(len(rows), busy)}


class OnnxRuntimeScorer(_Scorer):
    """ONNX Runtime (``.onnx``; CPUs, or CUDA with onnxruntime-gpu), ``threads`` intra-op threads per actor."""

    @staticmethod
    def open(spec: dict[str, Any]) -> Backend:
        return load_backend(spec["model"], "onnxruntime", spec["device"], threads=int(spec.get("threads") or 0))


class TorchScorer(_Scorer):
    """Eager torch on a checkpoint (a GPU with ``--gpus-per-actor``, else CPUs with ``threads`` threads)."""

    @staticmethod
    def open(spec: dict[str, Any]) -> Backend:
        if spec["device"] == "cpu" and spec.get("threads"):
            import torch

            torch.set_num_threads(int(spec["threads"]))
        return _Scorer.open(spec)


class TensorRTScorer(_Scorer):
    """A TensorRT engine (``.engine`` / ``.plan``) on the actor's GPU."""


class AotiScorer(_Scorer):
    """An AOTInductor package (``.pt2``) on the device it was compiled for."""


SCORERS: dict[str, type[_Scorer]] = {"onnxruntime": OnnxRuntimeScorer, "torch": TorchScorer, "tensorrt": TensorRTScorer, "aoti": AotiScorer}


# -------------------------------------------------------------------------------------------
# the driver


@dataclass
class RayScoreSummary(ScoreSummary):
    """A :class:`~lineside.runtime.results.ScoreSummary` with ``startup_seconds`` (from the start of the job to the
    first rows on the driver: the actors' start — a process, the runtime's import, the model's load — and the
    first batch) and ``actor_seconds`` (the actors' summed time in their batches)."""

    startup_seconds: float = float("nan")
    actor_seconds: float = 0.0

    @property
    def per_actor_images_per_second(self) -> float:
        """Rows per second of one busy actor (rows / the actors' summed seconds in their batches): the rate to size a
        cluster by, apart from the start and from waiting for decoded batches."""
        rows = self.scored + self.errors
        return rows / self.actor_seconds if self.actor_seconds > 0 and rows else float("nan")


def plan_model(model: str | os.PathLike, backend: str, device: str, input_size: Any, tta: int | None, text: str | None,
          trust_checkpoint: bool) -> tuple[Backend, dict[str, Any]]:
    """The backend the driver reads the model's layout from, and what the actors open.

    A checkpoint on CPUs: the driver makes the cached ONNX export (``lineside score``'s) and the actors run that
    file; a checkpoint on GPUs: the actors load it in eager torch; an artefact: the actors load it with the backend
    its suffix names (or ``backend``). The driver opens an artefact on the CPU only to read its layout; a TensorRT
    engine, which needs a GPU, gives its layout from its metadata."""
    path = os.fspath(model)
    is_ckpt = path.lower().endswith((".ckpt", ".pt"))
    if is_ckpt:
        layout_backend = "torch" if device != "cpu" and backend == "auto" else backend  # GPU actors run eager torch: no export
        runner = open_model(path, layout_backend, "cpu", input_size, tta, text, trust_checkpoint=trust_checkpoint)
        if device == "cpu" and runner.name.startswith("onnxruntime"):
            return runner, {"model": runner.path, "backend": "onnxruntime", "device": device}
        return runner, {"model": path, "backend": "torch", "device": device, "input_size": input_size, "tta": tta, "text": text,
                        "trust_checkpoint": trust_checkpoint}
    if input_size or tta or text:
        raise InputError(f"{model}: --input-size, --tta and --text are fixed in an exported artefact; re-export to change them")
    name = backend if backend != "auto" else backend_for(path)
    if name == "tensorrt":
        from lineside.export.metadata import read_metadata

        view = Backend(path)
        view.metadata = read_metadata(path)
        view.name = name
        return view, {"model": path, "backend": name, "device": device}
    return open_model(path, name, "cpu", trust_checkpoint=trust_checkpoint), {"model": path, "backend": name, "device": device,
                                                                               "trust_checkpoint": trust_checkpoint}


def _inputs(inputs: str | Iterable[str], output: Path) -> list[str]:
    """The paths to score (as ``lineside score`` collects them): results files inside an input folder are left out."""
    paths = collect_inputs(inputs) if isinstance(inputs, str) else [str(p) for p in inputs]
    if isinstance(inputs, str) and os.path.isdir(inputs):
        files = {os.path.abspath(output), os.path.abspath(str(output) + ".partial.csv"), os.path.abspath(str(output) + ".metrics.json")}
        paths = [p for p in paths if os.path.abspath(p) not in files]
    return paths


def score_on_ray(
    model: str | os.PathLike,
    inputs: str | Iterable[str],
    output: str | os.PathLike,
    *,
    address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0,
    cpus_per_actor: float = 1.0,
    batch_size: int = 32,
    backend: str = "auto",
    input_size: str | tuple[int, int] | None = None,
    tta_views: int | None = None,
    text: str | None = None,
    box_threshold: float = BOX_SCORE_THRESHOLD,
    retry_errors: bool = False,
    progress: bool = True,
    trust_checkpoint: bool = False,
    num_cpus: int | None = None,
) -> RayScoreSummary:
    """Score ``inputs`` with ``model`` on Ray and write/resume ``output`` (.csv or .parquet) with the rows of
    :func:`lineside.runtime.score.score`. See the module docstring.

    Args:
        address: a Ray cluster (``auto``, ``ray://host:10001``); None starts a local instance with ``num_cpus``.
        actors: actors in the pool, each holding the model once.
        gpus_per_actor: GPUs per actor (then the model runs on ``cuda``); 0 runs on CPUs.
        cpus_per_actor: logical CPUs per actor (and ONNX Runtime / torch threads, at least 1). On a cluster too
            small for the actors and a decoding task, the actors' share is lowered to fit (logged).
        batch_size: images per decoding task and per model call.
    """
    from lineside.runtime.score import _columns

    output = Path(output)
    if output.suffix.lower() not in (".csv", ".parquet"):
        raise InputError(f"{output}: output must end in .csv or .parquet")
    if actors < 1:
        raise InputError(f"--actors must be at least 1, got {actors}")
    device = "cuda" if gpus_per_actor > 0 else "cpu"
    view, spec = plan_model(model, backend, device, input_size, tta_views, text, trust_checkpoint)
    if view.takes_points:
        raise InputError(f"{view.describe()} takes point clouds; --engine ray scores images (use lineside score without --engine ray)")
    records = RecordBuilder(view, box_threshold)
    columns = _columns(view.class_names, "grade" in records.has, "boxes" in records.has, named=records.named_grades)
    scorer = SCORERS[spec["backend"]]
    spec |= {"box_threshold": box_threshold, "columns": columns, "threads": max(1, int(cpus_per_actor))}
    paths = _inputs(inputs, output)
    writer, previous, done = open_journal(output, columns, retry_errors)
    todo = [p for p in paths if p not in done]
    start = time.perf_counter()
    scored = errors = 0
    busy = 0.0
    first: float | None = None
    describe = f"{view.describe()} on Ray, {actors} {scorer.__name__} actor{'s' if actors > 1 else ''}"
    if todo:
        with ray_session(address, num_cpus) as ray:
            import ray.data

            total_cpus = float(ray.cluster_resources().get("CPU", 0.0))
            actor_cpus = float(cpus_per_actor)
            if actors * actor_cpus + DECODE_CPUS > total_cpus > 0:
                actor_cpus = max(0.01, (total_cpus - DECODE_CPUS) / actors)
                log.info("the cluster has %.0f CPUs: each actor reserves %.2f of them (decoding tasks need %.1f)", total_cpus, actor_cpus,
                         DECODE_CPUS)
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            ds = ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(todo)],
                                     override_num_blocks=min(len(todo), max(actors, min(-(-len(todo) // max(1, batch_size)), 200))))
            ds = ds.map_batches(decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=DECODE_CPUS,
                                fn_kwargs={"size": tuple(view.input_size), "channels": view.channels})
            ds = ds.map_batches(scorer, batch_size=batch_size, batch_format="numpy", fn_constructor_kwargs={"spec": spec},
                                concurrency=actors, num_cpus=actor_cpus, num_gpus=gpus_per_actor or None)
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="img", desc=f"scoring on Ray ({actors} actor{'s' if actors > 1 else ''})",
                       disable=not progress, dynamic_ncols=True)
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    rows = [json.loads(r) for r in batch["row"]]
                    if first is None:
                        first = time.perf_counter() - start
                    busy += float(np.sum(batch["actor_seconds"]))
                    writer.append(rows)
                    n_err = sum(1 for r in rows if r.get("error"))
                    errors += n_err
                    scored += len(rows) - n_err
                    bar.update(len(rows))
                    bar.set_postfix(errors=errors, refresh=False)
            finally:
                bar.close()
            if log.isEnabledFor(logging.DEBUG):  # where the time went, per operator (decoding, the actors)
                log.debug("%s", ds.stats())
    if output.suffix.lower() == ".parquet":
        finalise_parquet(writer, output, previous)
    return RayScoreSummary(len(paths), len(paths) - len(todo), scored, errors, time.perf_counter() - start, str(output), describe,
                           float("nan") if first is None else first, busy)
