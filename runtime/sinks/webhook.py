"""HTTP webhook sink: each record POSTed as JSON; any 2xx answer acknowledges it (urllib, no extra dependency).

    --webhook https://mes.example/api/inspections

Headers: ``Content-Type: application/json`` and ``Idempotency-Key: <seq>`` (the record's ``seq``,
also in the body), so a receiver can drop a record it already has (delivery is at least once).
Any other answer, a refused connection or a timeout leaves the record queued and it is sent again.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from lineside.runtime.sinks.base import Sink, SinkUnavailable

__all__ = ["WebhookSink"]


class WebhookSink(Sink):
    """POSTs each record to ``url``.

    Args:
        url: ``http://`` or ``https://``.
        timeout: seconds for one request.
        headers: extra request headers (e.g. ``Authorization``).
    """

    kind = "webhook"

    def __init__(self, url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{url}: a webhook URL starts with http:// or https:// and names a host")
        self.url = url
        self.name = re.sub(r"//[^@/]*@", "//", url)
        self.timeout = timeout
        self.headers = dict(headers or {})
        # no proxy from the environment: a line-side receiver is reached directly
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def send(self, record: dict) -> None:
        body = json.dumps(record, ensure_ascii=False, separators=(", ", ": "), allow_nan=False).encode()
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Idempotency-Key": str(record.get("seq", "")), **self.headers})
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raise SinkUnavailable(f"HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise SinkUnavailable(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from exc
        if not 200 <= status < 300:
            raise SinkUnavailable(f"HTTP {status}")
