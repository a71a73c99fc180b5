"""The pipeline's one policy for task failures, for every task of the workflows.

``@fail_fast()`` under ``@task``: a wrong parameter (``ml.errors.ParameterError``, also a batch
too big for the GPU) fails the task at once, without its retries, since the same input fails
the same way again; ``@fail_fast(PipelineError)`` widens that to every error a person must fix
first (the preflight's missing weights or GPU). Anything else (a store or server that is down,
a killed worker) is retried. The message is the error's one line.

``workflow(purpose)`` gives what every workflow shares: its start date, no catch-up, one run
at a time, the project's tags and the retry policy (2 retries, backing off from 1 minute to at
most 20).

Airflow puts the plugins folder on the import path of every process that reads the workflows.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import pendulum

Task = TypeVar("Task", bound=Callable[..., Any])


def fail_fast(*kinds: type[BaseException]) -> Callable[[Task], Task]:
    """Turn the ``kinds`` of error (default: ParameterError) into a failure without retries."""
    from ml.errors import ParameterError

    refused = kinds or (ParameterError,)

    def decorate(function: Task) -> Task:
        from airflow.sdk.exceptions import AirflowFailException

        if inspect.isgeneratorfunction(function):  # a task that yields asset metadata

            @functools.wraps(function)
            def generator(*args: Any, **kwargs: Any) -> Iterator[Any]:
                try:
                    return (yield from function(*args, **kwargs))
                except refused as error:
                    raise AirflowFailException(str(error)) from None

            generator.fails_fast_on = refused  # type: ignore[attr-defined]
            return generator  # type: ignore[return-value]

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except refused as error:
                raise AirflowFailException(str(error)) from None

        run.fails_fast_on = refused  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return decorate


def workflow(purpose: str) -> dict[str, Any]:
    """``@dag`` arguments every workflow of the pipeline shares (``purpose``: its own tag)."""
    return {
        "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
        "catchup": False,
        "max_active_runs": 1,
        "tags": ["image-sentiment", "ml", purpose],
        "default_args": {
            "retries": 2,
            "retry_delay": timedelta(minutes=1),
            "retry_exponential_backoff": 2.0,
            "max_retry_delay": timedelta(minutes=20),
        },
    }
