"""What the private servers of the benchmarks (``bench.load.LocalServer``, ``bench.prosody``,
``bench.ejabberd``) share: a process in a temporary directory, started until it is ready,
restarted on the same directory and ports (a fresh process, e.g. to measure memory without a
previous run's grown heap), stopped with SIGTERM, its directory removed unless kept."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class PeerProcess:
    """The process part of a private server; subclasses set ``name``, ``dir``, ``proc``
    and the files ``log_files`` whose tails explain a failure."""

    name = "server"
    stop_timeout = 15.0

    def __init__(self, directory: Path, keep: bool) -> None:
        self.dir = directory
        self.keep = keep
        self.proc: subprocess.Popen[bytes] | None = None

    def log_files(self) -> list[Path]:
        return []

    def launch(self) -> None:
        """Start the process on what ``start`` prepared; return once it serves."""
        raise NotImplementedError

    def restart(self) -> None:
        """A fresh process with the same data, config and ports."""
        self.terminate()
        self.launch()

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for path in self.log_files():
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return "\n".join(text.splitlines()[-lines:])

    def wait_listening(self, ports: list[int], timeout: float, poll: float = 0.05) -> None:
        """Until every port of ``ports`` on 127.0.0.1 accepts a connection; RuntimeError with
        the log's tail if the process exits or ``timeout`` passes first."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        waiting = list(ports)
        while waiting:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not start within {timeout:.0f} s:\n{self.log_tail()}"
                )
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", waiting[0])) == 0:
                    waiting.pop(0)
                    continue
            time.sleep(poll)

    def terminate(self) -> None:
        """End the process (SIGTERM, then SIGKILL after ``stop_timeout``); keep its files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self.terminate()
        if self.keep:
            sys.stderr.write(f"bench: kept {self.dir}\n")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
