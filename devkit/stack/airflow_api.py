"""A small client of Airflow's REST API (``/api/v2``): what the local stack and its tests ask
of a running Airflow, with the standard library only."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any


def quoted(run_id: str) -> str:
    return urllib.parse.quote(run_id, safe="")


class AirflowApi:
    """Airflow at ``base`` (``http://host:port``). ``credentials`` returns (user, password)
    where the API needs a bearer token (compose's auth manager); None where it lets everyone in
    (the local stack's)."""

    def __init__(self, base: str, credentials: Callable[[], tuple[str, str]] | None = None) -> None:
        self.base = base.rstrip("/")
        self._credentials = credentials
        self._token = ""
        self._task_order: dict[str, tuple[str, ...]] = {}

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._credentials is None:
            return headers
        if not self._token:
            username, password = self._credentials()
            request = urllib.request.Request(
                self.base + "/auth/token",
                data=json.dumps({"username": username, "password": password}).encode(),
                method="POST",
                headers=headers,
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                self._token = json.loads(response.read())["access_token"]
        return {**headers, "Authorization": f"Bearer {self._token}"}

    def call(self, method: str, path: str, body: Any | None = None) -> Any:
        """``method`` on ``/api/v2{path}``, the JSON answer (None for an empty one)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base + "/api/v2" + path, data=data, method=method, headers=self._headers()
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        """Unpause the DAG and start a run with ``conf``; its run id."""
        self.call("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        run = self.call("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return str(run["dag_run_id"])

    def run_state(self, dag_id: str, run_id: str) -> str:
        return str(self.call("GET", f"/dags/{dag_id}/dagRuns/{quoted(run_id)}")["state"])

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("GET", f"/dags/{dag_id}/dagRuns")["dag_runs"]
        return found

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        path = f"/dags/{dag_id}/dagRuns/{quoted(run_id)}/taskInstances?limit=1000"
        found: list[dict[str, Any]] = self.call("GET", path)["task_instances"]
        return found

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        """The return value of a finished task."""
        path = f"/dags/{dag_id}/dagRuns/{quoted(run_id)}/taskInstances/{task_id}"
        entry = self.call("GET", path + "/xcomEntries/return_value")
        value = entry.get("value")
        return json.loads(value) if isinstance(value, str) else value

    def task_order(self, dag_id: str) -> tuple[str, ...]:
        """The DAG's task ids in an order they can run in (upstream first), as the DAG itself
        declares them: asked of Airflow once, never restated here."""
        if dag_id not in self._task_order:
            tasks = self.call("GET", f"/dags/{dag_id}/tasks")["tasks"]
            self._task_order[dag_id] = upstream_first(
                {t["task_id"]: list(t.get("downstream_task_ids", [])) for t in tasks}
            )
        return self._task_order[dag_id]

    def wait_ready(self, dag_id: str, timeout: float) -> bool:
        """Whether, within ``timeout`` seconds, the metadata database, scheduler and DAG
        processor report healthy and ``dag_id`` is parsed."""
        deadline = time.monotonic() + timeout
        parts = ("metadatabase", "scheduler", "dag_processor")
        while time.monotonic() < deadline:
            try:
                health = self.call("GET", "/monitor/health")
                dags = self.call("GET", "/dags").get("dags", [])
                if all(health.get(p, {}).get("status") == "healthy" for p in parts) and any(
                    d["dag_id"] == dag_id for d in dags
                ):
                    return True
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(1)
        return False


def upstream_first(downstream: dict[str, list[str]]) -> tuple[str, ...]:
    """Task ids ordered so that each comes after all its upstream tasks; among tasks ready at
    the same time, the order they were given in."""
    waiting = {task: 0 for task in downstream}
    for targets in downstream.values():
        for target in targets:
            waiting[target] = waiting.get(target, 0) + 1
    order: list[str] = []
    ready = [task for task in downstream if waiting[task] == 0]
    while ready:
        task = ready.pop(0)
        order.append(task)
        for target in downstream.get(task, []):
            waiting[target] -= 1
            if waiting[target] == 0:
                ready.append(target)
    return tuple(order)
