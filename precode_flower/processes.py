"""Stop a command together with everything it spawned.

A command started with ``subprocess.Popen(..., start_new_session=True)`` leads a session
of its own; its descendants (Ray's GCS and raylet, Flower's SuperExec and app processes,
audit workers) stay in that session even when they outlive it. Finding them by session id
in ``/proc`` stops them all and nothing else, which the process group alone does not
(Ray daemonises some of its processes into groups of their own).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["session_pids", "signal_session", "stop_sessions"]


def session_pids(sid: int) -> list[int]:
    """The ids of the live processes in session ``sid`` (empty where /proc is missing)."""
    pids = []
    proc = Path("/proc")
    if not proc.is_dir():
        return pids
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def signal_session(sid: int, sig: int) -> None:
    """Send ``sig`` to every process of session ``sid`` (and to its leader, if /proc is missing)."""
    pids = session_pids(sid) if Path("/proc").is_dir() else [sid]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_sessions(leaders: Iterable[int], grace: float = 8.0, kill_wait: float = 10.0) -> bool:
    """SIGTERM every session in ``leaders``, SIGKILL what is left after ``grace`` seconds.

    ``grace=0`` kills at once. Returns whether every session is empty afterwards (it waits up
    to ``kill_wait`` seconds for the killed processes to go).
    """
    leaders = list(leaders)
    if grace > 0:
        for sid in leaders:
            signal_session(sid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(session_pids(s) for s in leaders):
            time.sleep(0.2)
    deadline = time.monotonic() + kill_wait
    while True:
        left = [s for s in leaders if session_pids(s)]
        if not left:
            return True
        if time.monotonic() > deadline:
            return False
        for sid in left:
            signal_session(sid, signal.SIGKILL)
        time.sleep(0.2)
