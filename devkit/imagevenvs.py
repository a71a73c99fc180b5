"""One virtual environment per image, built from the lock that image's Dockerfile target installs.

The native topology runs each compose service from the environment of its image (compose's
``build.target``), not from the all-in-one development venv: a package missing from an image's
lock then fails natively too, with the import that failed, before anyone builds the image.

The lock of each target is read from the Dockerfile itself (the file its stage copies to
``/tmp/build/`` and installs), so the two cannot disagree. uv installs from its cache by
hard links: a new environment takes seconds once the cache holds the packages, and an unchanged
lock costs nothing (a stamp of the lock's hash).

    venv = ensure("worker")          # .venv-images/worker, synced to requirements.txt
"""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / ".venv-images"
_STAGE = re.compile(r"^FROM\s+\S+\s+AS\s+(\S+)", re.IGNORECASE)
_COPY_LOCK = re.compile(r"^COPY\s+(\S+)\s+/tmp/build/\S*$", re.IGNORECASE)


def dockerfile_locks(text: str) -> dict[str, str]:
    """``{target: lock path}`` for every stage of a Dockerfile that copies a lock into
    /tmp/build/ and installs it (the base stage's installer excluded: every image has it)."""
    locks: dict[str, str] = {}
    stage = ""
    for line in text.splitlines():
        if found := _STAGE.match(line.strip()):
            stage = found.group(1)
        elif (found := _COPY_LOCK.match(line.strip())) and stage != "base":
            locks[stage] = found.group(1)
    return locks


def locks() -> dict[str, Path]:
    return {t: REPO / p for t, p in dockerfile_locks((REPO / "Dockerfile").read_text()).items()}


def service_target(compose: Mapping[str, Any], service: str) -> str:
    """The Dockerfile target compose builds ``service``'s image from."""
    build = compose["services"][service].get("build") or {}
    target = build.get("target")
    if not target:
        raise KeyError(f"compose service {service} is not built from the Dockerfile")
    return str(target)


def _uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        raise RuntimeError("uv is not installed: bash scripts/setup installs it into .venv")
    return found


@functools.cache
def ensure(target: str, root: Path = ROOT) -> Path:
    """The environment of image ``target``, synced to its lock (every file hash-checked); once
    per process (a plan asks for each service's environment several times)."""
    lock = locks()[target]
    venv = root / target
    want = hashlib.sha256(lock.read_bytes() + sys.version.encode() + b"bytecode").hexdigest()
    stamp = venv / ".lock.sha256"
    if stamp.is_file() and stamp.read_text() == want:
        return venv
    if not (venv / "bin" / "python").exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    done = subprocess.run(
        [
            _uv(),
            "pip",
            "sync",
            "--quiet",
            "--python",
            str(venv / "bin" / "python"),
            "--require-hashes",
            "--compile-bytecode",  # as the image does: no process compiles its imports again
            str(lock),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"cannot build the {target} image's environment from {lock.name}: "
            f"{done.stderr.strip()[-400:]}"
        )
    stamp.write_text(want)
    return venv


if __name__ == "__main__":  # scripts/test: build them while the package index is reachable
    for name in locks():
        print(f"{name}: {ensure(name)}")
