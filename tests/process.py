"""`tensorgate serve` as a real child process, as a user or a container runs it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

TENSORGATE = str(Path(sys.executable).parent / "tensorgate")
_LISTENING = re.compile(r"(?<!metrics )listening on (\S+):(\d+)")


def free_port() -> int:
    """A loopback port free right now, for servers that take fixed ports only (bind, read, release: another
    process may take it meanwhile, which is possible, not likely)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """Starts `tensorgate serve`, learns the port from its first "listening" log line, keeps all its output."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        # A free metrics port unless the test says otherwise: the default 8002 would collide between tests.
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TENSORGATE_METRICS_PORT": "0", **(env or {})}
        self.proc = subprocess.Popen(
            [TENSORGATE, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
        )
        self.lines: list[str] = []
        self._port: int | None = None
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line)
                m = _LISTENING.search(line)
                if m and self._port is None:
                    self._port = int(m.group(2))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = 60.0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    if rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output}")
                self._seen.wait(min(left, 0.5))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def address(self) -> str:
        self.wait_for_line("listening on")
        return f"127.0.0.1:{self._port}"

    def wait_in_flight(self, calls: int = 1, timeout: float = 60.0) -> None:
        """Until /metrics counts `calls` inference calls running: a call sent has then reached the server, where a
        fixed sleep on a loaded runner may signal the process before it has."""
        from tests.scraping import scrape, value  # tests.scraping imports the in-process server; not needed above

        line = self.wait_for_line(r"metrics listening on ")
        where = re.search(r"metrics listening on (\S+) \(http\)", line)
        assert where is not None, line
        deadline = time.monotonic() + timeout
        while value(scrape(f"http://{where.group(1)}/metrics"), "tensorgate_inflight_requests") < calls:
            assert time.monotonic() < deadline, f"{calls} call(s) never ran at once; output:\n{self.output}"
            time.sleep(0.05)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code (killing it only if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"tensorgate did not exit within {timeout}s of SIGTERM:\n{self.output}") from None

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
