"""Every party on one machine: a rehearsal of a deployment, as the tests and benchmarks run it.

:class:`LocalParties` starts each command (the FLARE server, each FLARE client, each trainer) in a
session of its own and stops them all by process id, with the processes they started (FLARE's job
processes open sessions of their own); :func:`free_ports` finds loopback ports for the project.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["LocalParties", "free_ports"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free at the time of the call."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalParties:
    """Processes started in their own sessions; :meth:`stop` kills them by id, whatever happened.

    Args:
        env: the environment of every process.
        cwd: their working directory.
    """

    def __init__(self, env: Mapping[str, str], cwd: str | Path) -> None:
        self.env = dict(env)
        self.cwd = Path(cwd)
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: Sequence[str], log: str | Path) -> subprocess.Popen[bytes]:
        """Run ``cmd`` with its output in ``log``."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                list(cmd), cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        """Kill every started process's session (its id is the process's), then its descendants."""
        import psutil

        for proc in self.started:
            children: list[psutil.Process] = []
            with contextlib.suppress(psutil.NoSuchProcess):
                children = psutil.Process(proc.pid).children(recursive=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.wait(timeout=60)
