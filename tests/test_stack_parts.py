"""The local stack's parts that need no running stack: the DAG's task order as Airflow's API
gives it, the progress line, and the promotion in words."""

from __future__ import annotations

from devkit.stack.airflow_api import upstream_first
from devkit.stack.report import describe_promotion, progress_line


def test_tasks_are_ordered_upstream_first_keeping_the_given_order_among_equals() -> None:
    downstream = {
        "register": [],
        "train": ["register"],
        "preflight": ["ingest"],
        "ingest": ["split", "changes"],
        "changes": ["train"],
        "split": ["train"],
    }
    order = upstream_first(downstream)
    assert order == ("preflight", "ingest", "split", "changes", "train", "register")
    for task, targets in downstream.items():
        assert all(order.index(task) < order.index(t) for t in targets)


def test_the_progress_line_counts_mapped_tasks_and_asks_training_where_it_is() -> None:
    tasks = [
        {"task_id": "ingest", "state": "success"},
        {"task_id": "download", "state": "success"},
        {"task_id": "download", "state": "running"},
        {"task_id": "download", "state": "success"},
        {"task_id": "train", "state": "running"},
    ]
    asked = []

    def training() -> str:
        asked.append(1)
        return "(epoch 2/16)"

    line = progress_line(tasks, ("ingest", "download", "train", "register"), training)
    assert line == "ingest done | download 2/3 | train (epoch 2/16) | register -"
    assert asked == [1]
    quiet = progress_line(tasks, ("train",), lambda: "")
    assert quiet == "train running"  # nothing known yet: the state itself


def test_a_promotion_reads_as_both_scores_and_the_interval() -> None:
    comparison = {
        "new_score": 0.785,
        "champion_score": 0.01,
        "images": 40,
        "gain": 0.775,
        "confidence": 0.95,
        "low": 0.69,
        "high": 0.96,
        "resamples": 2000,
    }
    line = describe_promotion(
        {"promoted": True, "comparison": comparison, "champion_version": 1, "reason": ""}
    )
    assert line.startswith("promoted to champion: macro-F1 0.785 vs champion v1 0.010")
    assert "95% interval +0.690 to +0.960" in line
    assert describe_promotion({"promoted": False, "reason": "first"}) == "stays challenger: first"
