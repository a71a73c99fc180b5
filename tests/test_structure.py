"""The code's structure holds: no import circles (in ml, in the local stack, between the
top-level folders), nothing edits the import path, and each run parameter's default is written
once, in the schema."""

from __future__ import annotations

import ast
from pathlib import Path

from devkit.structure import (
    RUN_CODE,
    cycles,
    declared_defaults,
    default_declarations,
    import_graph,
    package_graph,
    path_edits,
    python_files,
)
from ml.params import PARAMETERS
from tests.conftest import REPO


def test_the_ml_package_has_no_import_cycles() -> None:
    graph = import_graph(REPO / "ml")
    assert graph["registry"] and "predict" in graph["registry"]  # the graph is read
    assert cycles(graph) == []
    # MLflow's one door sits below tracking, registry and predict and imports none of them.
    assert not graph["mlflow_access"] & {"tracking", "registry", "predict", "train"}
    assert "fencing" not in graph["storage"]  # the store knows no leases (fencing hooks in)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_edits_the_import_path(tmp_path: Path) -> None:
    """Every folder runs as modules from the repository root (``python -m``): no file changes
    ``sys.path`` to reach another, and the finder does find each way of doing it."""
    assert path_edits(python_files()) == []
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import site, sys\nsys.path.insert(0, 'x')\nsys.path[:0] = ['y']\n"
        "site.addsitedir('z')\nprint(sys.path)\n"
    )
    found = path_edits([planted])
    assert sorted(line.rsplit(":", 1)[1] for line in found) == ["2", "3", "4"]


def test_the_top_level_folders_import_downward() -> None:
    """ml imports none of the others; the local stack's modules import no circle; no folder
    imports another that imports it back (the old circle: the stack script -> devkit -> the
    env script)."""
    graph = package_graph()
    assert graph["ml"] == set()
    assert graph["devkit"] >= {"ml", "deploy"} and "devkit" not in graph["deploy"]
    assert cycles(graph) == []
    stack = import_graph(REPO / "devkit" / "stack")
    assert stack["local"] >= {"processes", "airflow_api", "report"}
    assert cycles(stack) == []


def test_each_run_parameter_has_its_default_in_the_schema_only(tmp_path: Path) -> None:
    """No file but ml/params.py writes a literal default for a run parameter's name (in a
    signature or a dataclass field); the finder sees each way of writing one."""
    names = sorted(PARAMETERS)
    files = python_files(RUN_CODE)
    counts = default_declarations(names, files)
    assert len(counts) == len(PARAMETERS) > 40
    assert {name: n for name, n in counts.items() if n != 1} == {}
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from dataclasses import dataclass\n"
        "@dataclass\nclass C:\n    epochs: int = 3\n    seed: int = SEED\n"
        "def f(a, retries=-1, *, deadline=(1.0, 2.0), weights=None):\n"
        "    g(image_size=5)\n"
    )
    assert declared_defaults(ast.parse(planted.read_text())) == {"epochs", "retries", "deadline"}
