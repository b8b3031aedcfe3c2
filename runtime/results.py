"""Results of a scoring run: the durable row journal, resume, and the Parquet finish.

Batch scoring of images (:mod:`~lineside.runtime.score`) and of point clouds
(:mod:`~lineside.runtime.point_score`) both write through these: one row per input, appended and
fsync'ed as each batch finishes, so a crash loses nothing already scored, and running the same
command again skips finished rows. A Parquet output is journalled to ``<output>.partial.csv`` and
assembled atomically at the end.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from lineside.vision.io import InputError

__all__ = ["RowJournal", "ScoreSummary", "open_journal", "finalise_parquet"]


class RowJournal:
    """A CSV results file as a journal: rows are appended and fsync'ed per batch, finished rows read back
    for resuming (a torn last line from a crash is dropped), and rewritten atomically."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns

    def read_rows(self) -> list[dict]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []
        with open(self.path, "rb+") as fh:  # drop a torn last line left by a crash
            data = fh.read()
            if not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                fh.truncate(cut)
        with open(self.path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != self.columns:
                raise InputError(
                    f"{self.path}: existing results have columns {reader.fieldnames}, this model writes {self.columns}; "
                    "use another --output"
                )
            return list(reader)

    def rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, self.columns)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, rows: list[dict]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.columns)
        if new:
            w.writeheader()
        w.writerows(rows)
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())


@dataclass
class ScoreSummary:
    """What a scoring run did."""

    total: int
    skipped: int
    scored: int
    errors: int
    seconds: float
    output: str
    backend: str = ""

    @property
    def images_per_second(self) -> float:
        return (self.scored + self.errors) / self.seconds if self.seconds > 0 else float("nan")


def open_journal(
    output: Path, columns: list[str], retry_errors: bool, project: bool = False
) -> tuple[RowJournal, list[dict], set[str]]:
    """The results journal of a (resumable) scoring run: ``(writer, previous, done)``.

    CSV outputs are the journal itself; a Parquet output is journalled to ``<output>.partial.csv``
    and its earlier rows (``previous``) are read back so the final file keeps them. ``done`` holds
    the paths already scored; with ``retry_errors`` rows with an error are dropped (from the journal
    and ``previous``) so their inputs run again. ``project`` keeps only ``columns`` of earlier
    Parquet rows.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    parquet = output.suffix.lower() == ".parquet"
    writer = RowJournal(output.with_name(output.name + ".partial.csv") if parquet else output, columns)
    previous: list[dict] = []
    if parquet and output.exists():
        import pyarrow.parquet as pq

        rows = pq.read_table(output).to_pylist()
        previous = ([{c: ("" if r.get(c) is None else r.get(c)) for c in columns} for r in rows] if project
                    else [{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    done_rows = previous + writer.read_rows()
    if retry_errors:
        kept = [r for r in done_rows if not r.get("error")]
        if len(kept) != len(done_rows):
            previous = [r for r in previous if not r.get("error")]
            writer.rewrite([r for r in writer.read_rows() if not r.get("error")])
            done_rows = kept
    return writer, previous, {r["path"] for r in done_rows}


def finalise_parquet(journal: RowJournal, output: Path, previous: list[dict], types: dict[str, type] | None = None) -> None:
    """Write the journalled rows (after ``previous``) to ``output`` as Parquet, atomically, and drop the journal.
    ``types`` casts columns (``int`` / ``float``; empty cells become nulls); by default ``grade`` is int and
    ``confidence`` / ``p_*`` are float."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = previous + journal.read_rows()
    columns = journal.columns
    table = {c: [r.get(c, "") for r in rows] for c in columns}
    if types is None:
        # grade / grade_<task> int; confidence / confidence_<task> and p_* float (grade_name* stay text)
        types = {c: int if c.startswith("grade") else float for c in columns
                 if (c.startswith(("grade", "confidence")) and not c.startswith("grade_name")) or c.startswith("p_")}
    for c, cast in types.items():
        table[c] = [cast(v) if v not in ("", None) else None for v in table[c]]
    tmp = output.with_name(output.name + ".tmp")
    pq.write_table(pa.table(table), tmp)
    os.replace(tmp, output)
    journal.path.unlink(missing_ok=True)
