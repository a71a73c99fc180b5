"""Messages of a pipeline step keep their level in an orchestrator's task log.

An Airflow task log marks every line written to stderr as an error. MLflow logs through a
handler of its own that writes to stderr, and prints its run links there, so a successful
task showed red ERROR lines. Inside :func:`task_logging`, MLflow's records go to the root
logger (the task log, at their own level) and text printed to stderr goes to stdout.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

#: The loggers MLflow gives a stderr handler of its own when it is imported.
MLFLOW_LOGGERS = ("mlflow", "alembic", "sqlalchemy.engine", "huey")
Step = TypeVar("Step", bound=Callable[..., Any])


@contextlib.contextmanager
def task_logging() -> Iterator[None]:
    """MLflow's records to the root logger at their level; stderr text to stdout."""
    before = os.environ.get("MLFLOW_CONFIGURE_LOGGING")
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"  # an MLflow imported from now on
    saved = []
    for name in MLFLOW_LOGGERS:  # one imported already
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers, logger.propagate))
        logger.handlers = []
        logger.propagate = True
    try:
        with contextlib.redirect_stderr(sys.stdout):
            yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        if before is None:
            os.environ.pop("MLFLOW_CONFIGURE_LOGGING", None)
        else:
            os.environ["MLFLOW_CONFIGURE_LOGGING"] = before


def in_task(step: Step) -> Step:
    """Run ``step`` inside :func:`task_logging`."""

    @functools.wraps(step)
    def run(*args: Any, **kwargs: Any) -> Any:
        with task_logging():
            return step(*args, **kwargs)

    return run  # type: ignore[return-value]
