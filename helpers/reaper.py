"""Ends the processes of a local Ray when the sweep that started it ends, however it ends (kill -9 included).

Ray started by `ray.init()` leaves its dashboard and runtime-env agents running when the process that started it
is killed (Ray 2.60: seen after `kill -9`, still there minutes later; gcs_server and raylet die with it). So
helpers.sweep marks the environment of the Ray it starts (MARK=<token>, which every Ray process inherits) and
starts this reaper in a session of its own with a pipe on its stdin:

    python -m helpers.reaper TOKEN

It waits for the pipe to close (the sweep closed it when done, or the sweep died and the OS closed it), then
ends every process of this user whose environment holds the mark: SIGTERM, and SIGKILL after GRACE seconds.
Standard library only, so it starts in a fraction of a second; Linux (/proc), elsewhere it does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import time

MARK = "HELPERS_SWEEP_RAY"  # environment variable set for the Ray processes of one local sweep
GRACE = 5.0  # seconds between SIGTERM and SIGKILL (Ray's agents ignore SIGTERM for a while)


def marked(token: str) -> list[int]:
    """The processes (PIDs) of this user whose environment at start held MARK=token, other than this one."""
    needle, found = f"{MARK}={token}".encode(), []
    if not os.path.isdir("/proc"):
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:  # readable for our own processes only
                if needle in f.read().split(b"\0"):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def end_marked(token: str, *, grace: float = GRACE) -> list[int]:
    """SIGTERM every marked process, SIGKILL those left after `grace` seconds; returns the PIDs found."""
    pids = marked(token)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:  # gone already
                pass
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and marked(token) and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = marked(token)
    return pids


def main(token: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the sweep: the reaper waits for the pipe
    while sys.stdin.buffer.read(4096):  # b"" at EOF: the sweep closed the pipe or died
        pass
    end_marked(token)


if __name__ == "__main__":
    main(sys.argv[1])
