"""The code's structure holds: the ml package's modules never import each other in a circle."""

from __future__ import annotations

from devkit.structure import cycles, import_graph
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
