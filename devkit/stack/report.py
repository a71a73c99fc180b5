"""What the local stack says about a run while it goes and after: one progress line of every
task (a training run's epoch and step read from its MLflow run), and the promotion decision in
words. Rendering only: the stack passes in what it read."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

#: How each Airflow task state reads on the progress line.
MARKS = {
    "skipped": "skipped",
    "success": "done",
    "running": "running",
    "failed": "FAILED",
    "up_for_retry": "retrying",
    "up_for_reschedule": "waiting",
    "queued": "queued",
    "scheduled": "queued",
    "deferred": "deferred",
    "upstream_failed": "not run",
}


class TrainingProgress:
    """Where a DAG run's training is: the progress tag of the MLflow run it made, read with one
    client made on first use, inside ``session`` (the stack's client settings in the
    environment: its MLflow and, where it signs in, the credentials)."""

    def __init__(self, session: Callable[[], AbstractContextManager[None]], run_id: str) -> None:
        self._session = session
        self._run_id = run_id
        self._search: Callable[[], dict[str, str]] | None = None

    def _searcher(self) -> Callable[[], dict[str, str]]:
        from mlflow import MlflowClient

        from ml.params import PARAMETERS

        client = MlflowClient()
        experiment = client.get_experiment_by_name(PARAMETERS["experiment"].default)
        if experiment is None:
            raise LookupError("no experiment yet")
        query = f"tags.orchestrator_run_id = '{self._run_id}'"

        def search() -> dict[str, str]:
            runs = client.search_runs([experiment.experiment_id], query, max_results=1)
            return dict(runs[0].data.tags) if runs else {}

        return search

    def __call__(self) -> str:
        """ "(epoch 3/16, step 40/120)", or "" while there is nothing to say."""
        from ml.tracking import PROGRESS_TAG

        try:
            with self._session():
                if self._search is None:
                    self._search = self._searcher()
                tags = self._search()
        except Exception:  # progress is a courtesy: the line then says "running"
            return ""
        return f"({tags[PROGRESS_TAG]})" if PROGRESS_TAG in tags else ""


def progress_line(
    tasks: list[dict[str, Any]],
    order: tuple[str, ...],
    training: Callable[[], str] | None = None,
    training_task: str = "train",
) -> str:
    """Every task's state on one line, in the DAG's ``order``; a mapped task counts its done
    instances, and a running ``training_task`` says its epoch and step (``training``)."""
    parts = []
    for name in order:
        mine = [t for t in tasks if t["task_id"] == name]
        states = [t["state"] for t in mine]
        if len(mine) > 1:
            parts.append(f"{name} {states.count('success')}/{len(mine)}")
            continue
        mark = MARKS.get(states[0] or "", "waiting") if states else "-"
        if name == training_task and mark == "running" and training is not None:
            mark = training() or mark
        parts.append(f"{name} {mark}")
    return " | ".join(parts)


def describe_promotion(promotion: dict[str, Any]) -> str:
    """One line: the decision, both scores on the same images, and the interval."""
    verdict = "promoted to champion" if promotion["promoted"] else "stays challenger"
    c = promotion.get("comparison")
    if not c:
        return f"{verdict}: {promotion['reason']}"
    return (
        f"{verdict}: macro-F1 {c['new_score']:.3f} vs champion "
        f"v{promotion['champion_version']} {c['champion_score']:.3f} on the same {c['images']} "
        f"test images, gain {c['gain']:+.3f}, {c['confidence']:.0%} interval "
        f"{c['low']:+.3f} to {c['high']:+.3f} ({c['resamples']} paired resamples)"
    )
