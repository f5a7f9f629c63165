"""Which process a thing belongs to, and whether that process still runs: how a run left RUNNING, or a temporary
Prefect server, is told to be a leftover of a killed command rather than the work of a live one."""

from __future__ import annotations

import os
import socket

import psutil

# set by the CLI for itself, so that every process it starts (the temporary Prefect server among them) carries it
COMMAND_ENV = "DISTILLERY_COMMAND_PROCESS"


def this_process() -> str:
    """``"<host> <pid> <start time>"``: a pid alone is reused, the pair with its start time is not."""
    return f"{socket.gethostname()} {os.getpid()} {psutil.Process().create_time():.2f}"


def who() -> str:
    """``"user@host"`` of this command, for the records of what a person did by hand (the environment's
    ``DISTILLERY_USER`` first: the name a shared service account stands for)."""
    import getpass

    try:
        user = os.environ.get("DISTILLERY_USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def process_alive(process: str) -> bool | None:
    """Whether the process that ``this_process`` described still runs; None when that cannot be told from here
    (another host, or no such description)."""
    try:
        host, pid, started = process.rsplit(" ", 2)
        pid_number, started_at = int(pid), float(started)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(pid_number).create_time() - started_at) < 0.05
    except psutil.NoSuchProcess:
        return False


def orphaned_helpers(marker: str = "prefect.server.api.server:create_app") -> list[psutil.Process]:
    """Helper processes a distillery command started (they carry ``COMMAND_ENV``) whose command no longer runs, e.g.
    the temporary Prefect server of a command killed with SIGKILL; ``marker`` is in their command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker not in " ".join(proc.info["cmdline"] or ()):
                continue
            owner = proc.environ().get(COMMAND_ENV)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if owner and process_alive(owner) is False:
            found.append(proc)
    return found


def stop(processes: list[psutil.Process], grace_s: float = 5.0) -> int:
    """Terminate, then kill what is still there after ``grace_s``; returns how many were stopped."""
    for proc in processes:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return len(processes)
