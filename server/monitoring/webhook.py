"""POST alert transitions as JSON to a webhook (Slack/Alertmanager-style receivers, a pager bridge, a test).

The monitor loop must never wait on a slow or dead receiver, so ``send`` only enqueues: a background thread
does the HTTP work with a per-attempt timeout and a bounded number of retries with exponential backoff. When the
queue is full (the receiver is down for long), new transitions are dropped and counted rather than blocking.

The body is one JSON object per transition::

    {"source": "tensorgate", "rule": "low_accuracy", "model": "digits", "version": "1", "state": "firing",
     "value": 0.81, "threshold": 0.9, "timestamp": 1764220000.0}

A "resolved" adds why (``reason``: "recovered", "version no longer served", "rule removed", "rule changed"), when it
fired (``since``) and at what value (``fired_value``); its ``value`` is the last one judged, null when there is none
(JSON has no NaN).

Connection errors, timeouts and 5xx/429 answers are retried; other 4xx answers are not (the request itself is
wrong, sending it again will not help). A 3xx answer is a failure, not followed: urllib would repeat the POST as a
GET without its body and call that delivered.

Webhook URLs often carry a secret (a Slack-style path, ``?token=``), so logs name only scheme://host:port. A
``user:password@`` in the URL is sent as an ``Authorization: Basic`` header (urllib would take it for part of the
host name), never logged.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import queue
import threading
import urllib.error
import urllib.request
from dataclasses import asdict
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit, urlunsplit

if TYPE_CHECKING:  # alerts.py re-exports WebhookSender, so this module imports nothing of it at run time
    from tensorgate.server.monitoring.alerts import AlertTransition

__all__ = ["WebhookSender", "payload"]

logger = logging.getLogger("tensorgate.monitoring.webhook")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # the 3xx then surfaces as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect)


def payload(transition: AlertTransition) -> dict[str, object]:
    """The JSON object sent for a transition: the fields that are set, a non-finite number as null (strict JSON)."""
    fields = {k: v for k, v in asdict(transition).items() if v is not None and v != ""}
    return {
        "source": "tensorgate",
        **{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()},
    }


class WebhookSender:
    """Usage: ``sender = WebhookSender("http://127.0.0.1:9000/alerts"); sender.send(t); sender.close()``.

    ``sent``, ``failed`` (gave up after the retries) and ``dropped`` (queue full or closed) count deliveries.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_queue: int = 1000,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # Not the URL itself: a malformed one may still hold a secret.
            raise ValueError(
                f"alert webhook (scheme {parts.scheme!r}): expected an http:// or https:// URL with a host"
            )
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:  # the port may be a mistyped secret: not echoed
            raise ValueError(f"alert webhook {parts.scheme}://{parts.hostname}: the port is not a number") from None
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_queue < 1:
            raise ValueError("alert webhook: timeout_s > 0, retries >= 0, backoff_s >= 0 and max_queue >= 1 required")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.where = f"{parts.scheme}://{host}:{port}"
        """What logs show of the URL: its path and query may hold a secret."""
        self._headers = {"Content-Type": "application/json"}
        if parts.username is not None or parts.password is not None:
            userinfo = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode("ascii")
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        self._url = urlunsplit(parts._replace(netloc=netloc))
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._queue: queue.Queue[AlertTransition | None] = queue.Queue(maxsize=max_queue)  # None: stop
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tensorgate-alert-webhook", daemon=True)
        self._thread.start()

    def send(self, transition: AlertTransition) -> None:
        """Queue one transition for delivery; never blocks."""
        if self._closing.is_set():
            self.dropped += 1
            return
        try:
            self._queue.put_nowait(transition)
        except queue.Full:
            self.dropped += 1
            logger.warning(
                "alert webhook queue full: dropped %s %s for model '%s'",
                transition.rule,
                transition.state,
                transition.model,
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (backoff waits are cut short) for up to ``timeout_s``, then stop the thread."""
        self._closing.set()
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._deliver(item)

    def _deliver(self, transition: AlertTransition) -> None:
        body = json.dumps(payload(transition)).encode()
        for attempt in range(self.retries + 1):
            error = self._post(body)
            if error is None:
                self.sent += 1
                return
            retry, reason = error
            if not retry or attempt == self.retries:
                break
            # Exponential backoff; close() sets _closing and the remaining attempts go out without waiting.
            self._closing.wait(self.backoff_s * (2**attempt))
        self.failed += 1
        logger.warning(
            "alert webhook %s: gave up on %s %s for model '%s': %s",
            self.where,
            transition.rule,
            transition.state,
            transition.model,
            reason,
        )

    def _post(self, body: bytes) -> tuple[bool, str] | None:
        """None on success, else (worth retrying, reason)."""
        request = urllib.request.Request(self._url, data=body, method="POST", headers=self._headers)
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as response:
                response.read()
            return None
        except urllib.error.HTTPError as exc:
            exc.close()
            if 300 <= exc.code < 400:
                return False, f"HTTP {exc.code} (redirects are not followed: give the final URL)"
            return (exc.code >= 500 or exc.code == 429), f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            return True, str(exc)
