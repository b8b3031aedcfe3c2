"""A/B shadow switching at the station: operator labels, running accuracy, agreement, promotion.

    lineside station --model A.onnx --shadow B.onnx --source /camera/drop --out r.jsonl \
        --labels /line3/labels/ --promote-after 200 --margin 0.05

Model ``A`` (``--model``) starts active: its decisions go to the line. Model ``B`` (``--shadow``)
runs on the same frames, its decision kept in each record. Operator labels come back as CSV files
of ``path,label`` (label: a class name or index; a relative path is relative to the CSV's folder),
re-read whenever a file changes. Labels may come after the frame was scored: the decisions of
frames still without a label are kept (the newest ``keep``) to match a late label.

:class:`LabelBook` reads the labels, :class:`ShadowTracker` counts accuracy per model over the
labelled frames, agreement over all frames, and decides when the shadow takes over.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import sys
from collections import OrderedDict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["LabelBook", "ShadowTracker", "check_shadow_pair"]


def check_shadow_pair(active: Any, shadow: Any) -> None:
    """Raise ``ValueError`` unless ``shadow`` takes the same inputs and grades into the same classes as ``active``."""

    def specs(b: Any) -> list[tuple]:
        return [(s.get("name"), str(s.get("dtype")), tuple(s.get("shape", [])[1:])) for s in b.input_specs]

    if specs(active) != specs(shadow):
        raise ValueError(f"--shadow {shadow.describe()} takes inputs {specs(shadow)}, but --model {active.describe()} "
                         f"takes {specs(active)}: both models must take the same inputs to run on the same frames")
    if list(active.class_names) != list(shadow.class_names) or not active.class_names:
        raise ValueError(f"--shadow {shadow.describe()} grades into {list(shadow.class_names)}, --model {active.describe()} into "
                         f"{list(active.class_names)}: shadow switching compares grade decisions of the same classes")


class LabelBook:
    """Operator labels from a CSV of ``path,label`` or a folder of them (``*.csv``, subfolders too).

    :meth:`poll` looks at the files' size and mtime and re-reads only those that changed; it returns
    the labels that are new or changed since the last poll, by absolute path, as class names.
    """

    def __init__(self, spec: str | os.PathLike, class_names: Sequence[str], log: Any = None) -> None:
        self.spec = Path(spec)
        if not self.spec.exists():
            raise ValueError(f"--labels {spec}: no such file or folder")
        self.class_names = list(class_names)
        self.labels: dict[str, str] = {}
        self._seen: dict[Path, tuple[int, int]] = {}
        self._warned: set[str] = set()
        self.log = log

    def _files(self) -> list[Path]:
        if self.spec.is_dir():
            return sorted(p for p in self.spec.rglob("*.csv") if not p.name.startswith("."))
        return [self.spec] if self.spec.is_file() else []

    def _label(self, value: str) -> str | None:
        value = value.strip()
        if value in self.class_names:
            return value
        if value.lstrip("-").isdigit() and 0 <= int(value) < len(self.class_names):
            return self.class_names[int(value)]
        return None

    def _read(self, path: Path) -> dict[str, str]:
        found: dict[str, str] = {}
        try:
            with open(path, newline="", encoding="utf-8", errors="replace") as fh:
                rows = list(csv.reader(fh))
        except OSError:
            return found
        for n, row in enumerate(rows):
            if len(row) < 2 or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            label = self._label(row[1])
            if label is None:
                if n == 0 and row[1].strip().lower() == "label":
                    continue  # a header
                key = f"{path}:{row[1].strip()}"
                if key not in self._warned:
                    self._warned.add(key)
                    print(f"station: labels {path} line {n + 1}: {row[1].strip()!r} is no class of {self.class_names}; skipped",
                          file=self.log or sys.stderr, flush=True)
                continue
            p = row[0].strip()
            found[os.path.abspath(p if os.path.isabs(p) else path.parent / p)] = label
        return found

    def poll(self) -> dict[str, str]:
        """Labels new or changed since the last poll ({absolute path: class name})."""
        new: dict[str, str] = {}
        for f in self._files():
            try:
                st = f.stat()
            except OSError:
                continue
            sig = (st.st_mtime_ns, st.st_size)
            if self._seen.get(f) == sig:
                continue
            self._seen[f] = sig
            for path, label in self._read(f).items():
                if self.labels.get(path) != label:
                    self.labels[path] = label
                    new[path] = label
        return new


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class ShadowTracker:
    """Both models' decisions per frame, their accuracy on labelled frames, agreement, and promotion.

    Args:
        models: ``{"A": name, "B": name}`` (model paths); ``A`` starts active.
        promote_after: N: compare the last N labelled frames; 0: never switch.
        margin: the shadow takes over when its accuracy over the last N labelled frames leads the
            active model's by at least this (and by more than 0), and N labels have come since the
            start or the last switch.
        keep: decisions of unlabelled frames kept to match late labels (the oldest go first).
    """

    def __init__(self, models: dict[str, str], promote_after: int = 0, margin: float = 0.0, keep: int = 100_000) -> None:
        if promote_after < 0 or margin < 0:
            raise ValueError("--promote-after and --margin must not be negative")
        self.models = dict(models)
        self.active = "A"
        self.promote_after = int(promote_after)
        self.margin = float(margin)
        self.keep = max(1, int(keep))
        self.labels: dict[str, str] = {}
        self.pending: OrderedDict[str, dict[str, str | None]] = OrderedDict()
        self.window: deque[dict[str, bool]] = deque(maxlen=self.promote_after or 1000)
        self.frames = self.compared = self.agreed = self.labelled = 0
        self.correct = {"A": 0, "B": 0}
        self.since_switch = 0
        self.switches = 0

    @property
    def shadow(self) -> str:
        return "B" if self.active == "A" else "A"

    def observe(self, path: str | None, decisions: dict[str, str | None]) -> None:
        """One frame's decisions by both models (``{"A": …, "B": …}``)."""
        self.frames += 1
        if decisions["A"] is not None and decisions["B"] is not None:
            self.compared += 1
            self.agreed += decisions["A"] == decisions["B"]
        if not path:
            return
        key = os.path.abspath(path)
        if key in self.labels:
            self._score(decisions, self.labels[key])
        else:
            self.pending[key] = dict(decisions)
            while len(self.pending) > self.keep:
                self.pending.popitem(last=False)

    def add_labels(self, labels: dict[str, str]) -> None:
        """New labels: a frame already scored and waiting is counted now; later frames when they come."""
        self.labels.update(labels)
        for path, label in labels.items():
            decisions = self.pending.pop(path, None)
            if decisions is not None:
                self._score(decisions, label)

    def _score(self, decisions: dict[str, str | None], label: str) -> None:
        ok = {m: decisions[m] == label for m in ("A", "B")}
        self.labelled += 1
        self.since_switch += 1
        for m, right in ok.items():
            self.correct[m] += right
        self.window.append(ok)

    def accuracy(self, model: str) -> float | None:
        return self.correct[model] / self.labelled if self.labelled else None

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    def maybe_promote(self) -> dict | None:
        """Swap active and shadow when the shadow leads; returns the ``promote`` record, else None."""
        n = self.promote_after
        if not n or self.since_switch < n or len(self.window) < n:
            return None
        last = list(self.window)[-n:]
        right = {m: sum(w[m] for w in last) for m in ("A", "B")}
        old, new = self.active, self.shadow
        lead = (right[new] - right[old]) / n
        if lead <= 0 or lead < self.margin - 1e-12:
            return None
        self.active, self.since_switch = new, 0
        self.switches += 1
        return {
            "event": "promote", "timestamp": _now(), "active": new, "model": self.models[new],
            "previous": old, "previous_model": self.models[old], "window": n, "margin": self.margin,
            "correct": right, "accuracy": {m: round(right[m] / n, 6) for m in right},
            "labelled": self.labelled, "frames": self.frames, "agreement": _round(self.agreement),
        }

    def status(self) -> dict:
        """The ``station_status`` record: running accuracy per model, agreement, counts."""
        return {
            "event": "station_status", "timestamp": _now(), "active": self.active, "model": self.models[self.active],
            "shadow_model": self.models[self.shadow], "frames": self.frames, "labelled": self.labelled,
            "correct": dict(self.correct), "accuracy": {m: _round(self.accuracy(m)) for m in ("A", "B")},
            "compared": self.compared, "agreed": self.agreed, "agreement": _round(self.agreement),
            "awaiting_labels": len(self.pending), "switches": self.switches,
        }

    def line(self) -> str:
        """For the progress line."""
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.1f} %"

        return (f"; active {self.active}, {self.labelled} labelled: accuracy A {pct(self.accuracy('A'))} "
                f"B {pct(self.accuracy('B'))}, agreement {pct(self.agreement)}")


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 6)
