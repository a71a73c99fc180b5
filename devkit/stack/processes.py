"""The local stack's processes, read from ``/proc``: who started whom, what is still alive,
what listens where; and how to stop a whole tree at once, as a machine failure would."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import time
from pathlib import Path


def alive(pid: int, *, group: bool = False) -> bool:
    """Whether the process (or, with ``group``, any process of the group) still exists."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def marked(marker: str) -> list[int]:
    """Processes whose environment carries this stack's marker (any process group)."""
    found = []
    needle = f"STACK_MARKER={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def process_table() -> dict[int, tuple[str, int, int, int]]:
    """pid: (state, parent, process group, session) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (fields[0], int(fields[1]), int(fields[2]), int(fields[3]))
    return table


def started_by(services: list[int], marker: str = "") -> list[int]:
    """Every living process the services (their pids) started: in their sessions or process
    groups (a task orphaned by a killed worker keeps its session when it moves to another
    parent, and Airflow gives each task a process group of its own), below them in the process
    tree (one that started a session of its own), or carrying the stack's marker."""
    table = process_table()
    roots = set(services)
    found = {pid for pid, (_, _, group, session) in table.items() if {group, session} & roots}
    found |= roots & set(table)
    if marker:
        found |= set(marked(marker))
    children: dict[int, list[int]] = {}
    for pid, (_, parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    return sorted(pid for pid in found if table.get(pid, ("Z",))[0] != "Z")


def send(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def kill_everything(services: list[int], marker: str = "", wait: float = 30.0) -> list[int]:
    """SIGKILL everything the services started, at once, as a machine failure would: first
    frozen (SIGSTOP, so that nothing forks or writes while the tree is walked), then killed.
    Returns what is still alive after ``wait`` seconds (nothing, normally)."""
    frozen: set[int] = set()
    for _ in range(10):
        found = set(started_by(services, marker)) - frozen
        if not found:
            break
        send(sorted(found), signal.SIGSTOP)
        frozen |= found
    send(sorted(frozen), signal.SIGKILL)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        left = started_by(services, marker)
        if not left:
            return []
        send(left, signal.SIGKILL)
        time.sleep(0.2)
    return started_by(services, marker)


def terminate(services: list[int], marker: str = "", grace: float = 30.0) -> list[int]:
    """SIGTERM everything the services started, ``grace`` seconds as ``docker compose stop``
    gives, then SIGKILL what is left; returns what survived even that (nothing, normally)."""
    send(started_by(services, marker), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and started_by(services, marker):
        time.sleep(0.2)
    return kill_everything(services, marker, wait=10.0) if started_by(services, marker) else []


def listeners(services: list[int], marker: str) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of the services' processes."""
    sockets: dict[str, tuple[str, int]] = {}
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                host, port = fields[1].split(":")
                sockets[fields[9]] = (proc_address(host, family), int(port, 16))
    found = []
    for pid in started_by(services, marker):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                inode = target[len("socket:[") : -1] if target.startswith("socket:[") else ""
                if inode in sockets:
                    found.append((pid, *sockets[inode]))
    return sorted(set(found))


def proc_address(hexed: str, family: int) -> str:
    """An address as /proc/net/tcp* writes it (little-endian 32-bit words) in text."""
    raw = bytes.fromhex(hexed)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.IPv4Address(words) if family == 4 else ipaddress.IPv6Address(words))
