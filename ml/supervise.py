"""Run a child process tree so that it cannot outlive the task that started it.

torchrun's agent starts each rank in a session of its own, so ending the agent's process group
leaves the ranks holding their GPUs. Here a command runs in a new session, its output is passed
on line by line as it comes (an OOM kill still leaves the lines before it in the task log), and
on any exit of the caller (failure, timeout, kill request) every process it started is ended:
found by walking ``/proc`` (pid and start time, so a reused pid is never hit), SIGTERM, a grace
period, then SIGKILL. A caller killed outright (SIGKILL) cannot run that code: the launcher
(:mod:`ml.launch`) and each rank ask the kernel to send them SIGTERM when their parent dies
(``PR_SET_PDEATHSIG``), so the tree unwinds from the top.

Usage: ``code, tail = run_supervised(command, on_line=log.info)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1

#: The supervisor's pid, for a launcher to check that its parent did not die before it asked
#: to die with it.
PARENT_VARIABLE = "ML_SUPERVISOR_PID"


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux only);
    whether it could."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> list[tuple[int, int]]:
    """Every living process below ``root``, as (pid, start time)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            found = _stat(int(entry.name))
            if found is not None:
                children.setdefault(found[0], []).append((int(entry.name), found[1]))
    tree: list[tuple[int, int]] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            tree.append(child)
            todo.append(child[0])
    return tree


def _signal_all(processes: Sequence[tuple[int, int]], sig: int) -> None:
    for pid, started in processes:
        found = _stat(pid)
        if found is not None and found[1] == started:  # the same process, not a reused pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _alive(processes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    living = []
    for pid, started in processes:
        found = _stat(pid)
        state = ""
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{pid}/stat").read_text()
            state = text[text.rindex(")") + 2 :].split()[0]
        if found is not None and found[1] == started and state != "Z":
            living.append((pid, started))
    return living


def end_tree(process: subprocess.Popen[str], grace: float = 30.0) -> None:
    """End ``process`` and everything it started: SIGTERM, ``grace`` seconds, SIGKILL."""
    started = _stat(process.pid)
    tree = descendants(process.pid)
    if process.poll() is None and started is not None:
        tree.append((process.pid, started[1]))
    _signal_all(tree, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(0.2)
        tree = _alive(tree + [p for p in descendants(process.pid) if p not in tree])
        if not tree:
            break
    _signal_all(_alive(tree), signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


def run_supervised(
    command: Sequence[str],
    on_line: Callable[[str], None],
    *,
    grace: float = 30.0,
    env: Mapping[str, str] | None = None,
    keep: int = 200,
) -> tuple[int, list[str]]:
    """Run ``command`` (stdout and stderr merged), passing each line to ``on_line`` as it comes;
    return its exit code and its last ``keep`` lines. Whatever ends the wait (an exception, a
    signal turned into one), the command and every process it started are ended."""
    process = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        env={**(os.environ if env is None else env), PARENT_VARIABLE: str(os.getpid())},
    )
    tail: deque[str] = deque(maxlen=keep)
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            on_line(line)
        code = process.wait()
    finally:
        end_tree(process, grace)  # also ends ranks left behind by an agent that exited
    return code, list(tail)
