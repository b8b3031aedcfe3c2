"""A sink behind its on-disk spool: the station appends, a sender thread delivers in order.

``write(records)`` (the station's thread) only appends to the spool: it never waits for the
network and never drops a record. The sender thread takes records from the spool's head in
``seq`` order, hands them to the sink and deletes them only once acknowledged; while the far end
is down it retries with exponential backoff and the records wait on disk, also across a restart
of the station (the next run sends them first). A record is sent again when its acknowledgement
was lost, so delivery is at least once, in order, and ``seq`` lets a receiver drop repeats.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable
from typing import IO

from lineside.runtime.sinks.base import Sink, SinkUnavailable
from lineside.runtime.sinks.spool import Spool

__all__ = ["SpooledSink"]


class SpooledSink:
    """``sink`` fed from the spool at ``spool_path`` by a background sender.

    Args:
        sink: the destination (MQTT, OPC UA, webhook …).
        spool_path: the spool's SQLite file; records left there by an earlier run are sent first.
        batch: the most records handed to the sink at once.
        backoff: first and longest wait (s) between attempts while the far end is down.
        drain_timeout: :meth:`close` waits at most this long (s) for the spool to empty.
        log: where state changes go (down, up again, what is left at close); default stderr.
    """

    def __init__(
        self,
        sink: Sink,
        spool_path: str | os.PathLike,
        batch: int = 64,
        backoff: tuple[float, float] = (0.1, 5.0),
        drain_timeout: float = 5.0,
        log: IO[str] | None = None,
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self.spool = Spool(spool_path)
        self.batch = max(1, int(batch))
        self.backoff = (max(0.001, backoff[0]), max(backoff))
        self.drain_timeout = drain_timeout
        self.log = log
        self.sent = 0  # records acknowledged in this run
        self.down: str | None = None  # why the last attempt failed, while the far end is down
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sender, name=f"sink-{sink.kind}", daemon=True)
        self._thread.start()

    # -- the station's side ----------------------------------------------------------------------
    def write(self, records: Iterable[dict]) -> None:
        """Queue records (durable on disk on return); the sender delivers them."""
        if self.spool.append(records):
            self._wake.set()

    @property
    def queued(self) -> int:
        """Records not yet acknowledged."""
        try:
            return len(self.spool)
        except sqlite3.ProgrammingError:  # closed
            return -1

    def close(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` (default ``drain_timeout``) for the spool to drain, then stop; what
        is left stays in the spool for the next run."""
        timeout = self.drain_timeout if timeout is None else timeout
        self._closing.set()
        self._wake.set()
        end = time.monotonic() + max(0.0, timeout)
        while self._thread.is_alive() and time.monotonic() < end:
            self._thread.join(0.05)
        self._stop.set()
        self._wake.set()
        self._thread.join(10.0)
        try:
            self.sink.close()
        except Exception as exc:  # noqa: BLE001 - closing a broken connection
            self._say(f"closing: {type(exc).__name__}: {exc}")
        left = self.queued
        if left:
            why = f" ({self.down})" if self.down else ""
            self._say(f"{self.sent} records sent, {left} queued in {self.spool.path}{why}; they are sent when the station next starts")
        else:
            self._say(f"{self.sent} records sent, none queued")
        if not self._thread.is_alive():
            self.spool.close()

    # -- the sender thread -----------------------------------------------------------------------
    def _say(self, text: str) -> None:
        print(f"sink {self.name}: {text}", file=self.log or sys.stderr, flush=True)

    def _sender(self) -> None:
        delay = self.backoff[0]
        while not self._stop.is_set():
            self._wake.clear()
            rows = self.spool.head(self.batch)
            if not rows:
                if self._closing.is_set():
                    return
                self._wake.wait(0.5)
                continue
            records = [{"seq": seq, **json.loads(text)} for seq, text in rows]
            try:
                delivered, error = self.sink.send_batch(records), None
            except SinkUnavailable as exc:
                delivered, error = exc.delivered, str(exc)
            except Exception as exc:  # noqa: BLE001 - a sink bug or an unexpected error: retry, never drop
                delivered, error = 0, f"{type(exc).__name__}: {exc}"
            if delivered:
                try:
                    self.spool.done(rows[delivered - 1][0])
                except sqlite3.ProgrammingError:  # closed under a sender that outlived close()
                    return
                self.sent += delivered
            if error is None:
                if self.down is not None:
                    self.down = None
                    self._say(f"up again, sending the {self.queued} queued records")
                delay = self.backoff[0]
                continue
            if self.down is None:
                self._say(f"down: {error}; records wait in {self.spool.path} ({self.queued} queued), retrying")
            self.down = error
            self._stop.wait(delay)
            delay = min(delay * 2, self.backoff[1])

    def __repr__(self) -> str:
        return f"SpooledSink({self.sink!r}, {str(self.spool.path)!r})"
