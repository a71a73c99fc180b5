"""The code's structure holds: no import circles (in ml, in the local stack, between the
top-level folders), and nothing edits the import path."""

from __future__ import annotations

from pathlib import Path

from devkit.structure import cycles, import_graph, package_graph, path_edits, python_files
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
