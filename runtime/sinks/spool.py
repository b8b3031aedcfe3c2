"""An append-only on-disk queue of records for one sink (SQLite, WAL, fsync'ed per append).

One row per record: ``seq`` (``INTEGER PRIMARY KEY AUTOINCREMENT``: increasing, never reused, also
after rows are deleted or the station restarts) and the record as JSON text. The station appends a
batch in one transaction; the sender reads from the head in ``seq`` order and deletes rows only
once the far end acknowledged them, so a crash or a power cut at any point loses nothing (records
not yet acknowledged are sent again: at least once).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

__all__ = ["Spool"]


class Spool:
    """Records queued on disk for one sink, in order.

    Args:
        path: the SQLite file (created with its folder).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed append survives a power cut
        self._db.execute("CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY AUTOINCREMENT, record TEXT NOT NULL)")

    def append(self, records: Iterable[dict]) -> int:
        """Queue records (one transaction, durable on return); returns how many."""
        rows = [(json.dumps(r, ensure_ascii=False, separators=(", ", ": "), allow_nan=False),) for r in records]
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO records (record) VALUES (?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return len(rows)

    def head(self, n: int) -> list[tuple[int, str]]:
        """The oldest ``n`` queued records: ``(seq, JSON text)``, in order."""
        with self._lock:
            return self._db.execute("SELECT seq, record FROM records ORDER BY seq LIMIT ?", (int(n),)).fetchall()

    def done(self, upto: int) -> None:
        """Drop the records up to and including ``seq`` ``upto`` (acknowledged by the far end)."""
        with self._lock:
            self._db.execute("DELETE FROM records WHERE seq <= ?", (int(upto),))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"Spool({str(self.path)!r})"
