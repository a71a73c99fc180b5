"""Print the requirements of dependency groups declared in pyproject.toml, one per line.

The Docker image's targets install from here, so pyproject.toml is the one place that says
what each service needs (exact versions come from the lock, passed to pip as constraints).

    python -m deploy.extras core airflow     # core = [project] dependencies
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(groups: list[str], pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    found: list[str] = []
    for group in groups:
        extras = project["optional-dependencies"]
        items = project["dependencies"] if group == "core" else extras[group]
        found.extend(item for item in items if item not in found)
    return found


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    candidates = (here.parent / "pyproject.toml", here / "pyproject.toml")
    pyproject = next(p for p in candidates if p.is_file())
    print("\n".join(requirements(sys.argv[1:], pyproject)))
