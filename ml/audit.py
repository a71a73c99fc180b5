"""The audit trail: append-only ledgers in the store, and every alias move recorded in one.

A ledger is a folder of numbered JSON objects (``00000001.json``, ...). An entry is written with
a conditional PUT (``If-None-Match: *``), so two writers that race for the same number cannot
both win: the loser reads the ledger again and takes the next number. Nothing ever rewrites or
deletes an entry. The ledgers live in the store, so losing the MLflow database loses none of
them::

    audit/aliases/<model>/00000001.json     each move of an alias (challenger, champion)
    audit/forget/00000001.json              each request to forget an image (ml.forget)
    audit/lineage/<model>/v<N>-split.parquet  the split version N trained on, as it was

Alias moves (:func:`move_alias`) are recorded *before* the alias is set, and the ledger is the
truth: after setting the alias, the mover reads the ledger again and sets the alias to the
latest entry's version until the two agree, so concurrent moves end with the alias where the
last recorded move put it, and every move keeps its entry. A move interrupted between its
entry and the alias is finished by the next move or registration (:func:`reconcile`).

In MLflow, the version an alias moves to gets ``audit.<alias>.*`` tags (since, by, reason,
the ledger number), and the registered model's description ends with the latest moves.

Usage: ``move_alias(client, store, root, "image-sentiment", "champion", "7", action="rollback",
reason="v8 mislabels memes")``; ``history(store, root, "image-sentiment")``.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ml import fencing
from ml.containment import check_name
from ml.errors import PipelineError
from ml.layout import StoreLayout
from ml.redact import get_logger, redact_text
from ml.storage import ObjectStore
from ml.uri import S3Uri

log = get_logger(__name__)

ALIASES = ("challenger", "champion")
HISTORY_HEADING = "Alias history (newest first; the full record: python -m ml history)"
#: Moves shown in the registered model's description.
DESCRIBED_MOVES = 10
MAX_REASON = 2000
_APPEND_TRIES = 50


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def actor(airflow_run: str) -> str:
    """Who makes a change: the Airflow run, else ("") the command line's user and host."""
    if airflow_run:
        return f"airflow run {airflow_run}"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"command line, {user}@{socket.gethostname()}"


def check_reason(reason: str | None) -> str:
    """A reason is required for every change a person makes, and kept short (on one line,
    with any secret a URL in it carries redacted: it goes into the ledger and MLflow)."""
    text = redact_text(" ".join((reason or "").split()))
    if not text:
        raise PipelineError("--reason must say why (it is kept in the audit trail), got nothing")
    if len(text) > MAX_REASON:
        raise PipelineError(f"--reason is {len(text)} characters; keep it under {MAX_REASON}")
    return text


class Ledger:
    """An append-only ledger: numbered JSON entries under ``folder``."""

    def __init__(self, store: ObjectStore, folder: S3Uri) -> None:
        self.store, self.folder = store, folder
        self._read: dict[str, dict[str, Any]] = {}

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first."""
        keys = [k for k in self.store.list_keys(self.folder) if k.endswith(".json")]
        for key in keys:
            if key not in self._read:
                uri = S3Uri(self.folder.bucket, key)
                self._read[key] = self.store.read_json(uri, hint="the audit ledger is damaged")
        return sorted((self._read[k] for k in keys), key=lambda e: int(e["seq"]))

    def append(
        self, make: Callable[[list[dict[str, Any]]], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        """Write the entry ``make(entries so far)`` under the next number; if another writer
        took that number first, read again and make it anew. ``make`` returns None when the
        entries already say it (nothing is written then)."""
        for _ in range(_APPEND_TRIES):
            entries = self.entries()
            seq = int(entries[-1]["seq"]) + 1 if entries else 1
            made = make(entries)
            if made is None:
                return None
            entry = {"seq": seq, **made}
            data = json.dumps(entry, indent=2, sort_keys=True, default=str).encode()
            fencing.check()  # a superseded attempt records nothing
            if self.store.put_bytes(
                self.folder.child(f"{seq:08d}.json"),
                data,
                content_type="application/json",
                if_absent=True,
            ):
                return entry
        raise PipelineError(
            f"the audit ledger {self.folder} kept changing under {_APPEND_TRIES} tries; retry"
        )

    def add(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Append ``payload`` as it is under the next number."""
        written = self.append(lambda _: payload)
        if written is None:  # unreachable: this make never declines
            raise PipelineError(f"the audit ledger {self.folder} declined an entry")
        return written


def alias_ledger(store: ObjectStore, root: str | S3Uri, name: str) -> Ledger:
    check_name(name, "model_name")
    layout = StoreLayout.parse(root)
    return Ledger(store, layout.alias_ledger(name))


def _latest(entries: list[dict[str, Any]], alias: str) -> dict[str, Any] | None:
    return next((e for e in reversed(entries) if e["alias"] == alias), None)


def _current(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    from ml import mlflow_access

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if mlflow_access.missing(exc) or mlflow_access.denied(exc):
            return None
        raise


def move_alias(
    client: Any,
    ledger: Ledger,
    name: str,
    alias: str,
    version: str | int,
    *,
    action: str,
    reason: str,
    by: str = "",
    decision: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Point ``alias`` of ``name`` at ``version``, recorded first; None when it already
    points there and the ledger agrees (nothing moved, nothing recorded)."""
    version = str(version)
    reconcile(client, ledger, name)
    latest = _latest(ledger.entries(), alias)
    recorded = latest is not None and str(latest["to_version"]) == version
    if recorded and _current(client, name, alias) == version:
        return None
    # A move back to where the record already points (after a move outside the pipeline)
    # is recorded again; a move another call is recording right now is not.
    retelling = recorded

    def make(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        before = _latest(entries, alias)
        if before is not None and str(before["to_version"]) == version and not retelling:
            return None  # the same move, recorded meanwhile by a call running at the same time
        previous = before["to_version"] if before else _current(client, name, alias)
        return {
            "time": now(),
            "model": name,
            "alias": alias,
            "from_version": int(previous) if previous else None,
            "to_version": int(version),
            "action": action,
            "by": by or actor(""),
            "reason": redact_text(reason)[:MAX_REASON],
            "decision": decision,
        }

    entry = ledger.append(make)
    _settle(client, ledger, name, alias, version)
    if entry is None:
        return None
    _tag(client, name, entry)
    describe_history(client, name, ledger.entries())
    log.info(
        "%s of %s: v%s -> v%s (%s, %s)",
        alias,
        name,
        entry["from_version"],
        version,
        action,
        entry["reason"],
    )
    return entry


def _settle(client: Any, ledger: Ledger, name: str, alias: str, version: str) -> None:
    """Set the alias, then follow the ledger until the alias is where its latest entry says:
    a move recorded after ours (by another writer) wins, whoever sets the alias last."""
    target = version
    for _ in range(_APPEND_TRIES):
        fencing.check()
        client.set_registered_model_alias(name, alias, target)
        latest = _latest(ledger.entries(), alias)
        wanted = str(latest["to_version"]) if latest else target
        if wanted == target:
            return
        target = wanted
    raise PipelineError(f"the {alias} of {name} kept moving; run `python -m ml history`")


def reconcile(client: Any, ledger: Ledger, name: str) -> list[str]:
    """Finish moves that were recorded but never reached MLflow (a process killed between
    the two); returns what was set right."""
    fixed = []
    entries = ledger.entries()
    for alias in ALIASES:
        latest = _latest(entries, alias)
        if latest is None:
            continue
        wanted, found = str(latest["to_version"]), _current(client, name, alias)
        if found != wanted:
            log.warning(
                "the %s of %s is v%s but the audit trail's last move (#%s) put it at v%s: "
                "setting it to v%s",
                alias,
                name,
                found,
                latest["seq"],
                wanted,
                wanted,
            )
            _settle(client, ledger, name, alias, wanted)
            fixed.append(f"{alias}: v{found} -> v{wanted}")
    return fixed


def _tag(client: Any, name: str, entry: dict[str, Any]) -> None:
    """``audit.<alias>.*`` tags on the version the alias moved to."""
    prefix = f"audit.{entry['alias']}"
    tags = {
        f"{prefix}.since": entry["time"],
        f"{prefix}.by": entry["by"],
        f"{prefix}.action": entry["action"],
        f"{prefix}.reason": entry["reason"][:5000],
        f"{prefix}.ledger_entry": str(entry["seq"]),
        f"{prefix}.replaced_version": str(entry["from_version"] or ""),
    }
    for key, value in tags.items():
        _set_tag(client, name, str(entry["to_version"]), key, value)


def _set_tag(client: Any, name: str, version: str, key: str, value: str) -> None:
    """Set a version tag; two callers setting the same new tag at once can make MLflow's
    database refuse the second insert (its upsert is not atomic): that one tries again, and
    the row now exists."""
    from mlflow.exceptions import MlflowException

    from ml import mlflow_access

    for attempt in range(3):
        try:
            client.set_model_version_tag(name, version, key, value)
            return
        except MlflowException as exc:
            if attempt == 2 or not mlflow_access.exists(exc):
                raise


def history_text(entries: list[dict[str, Any]], limit: int | None = None) -> str:
    """The moves as a Markdown table, newest first."""
    shown = list(reversed(entries))[:limit] if limit else list(reversed(entries))
    lines = [
        "| # | when (UTC) | alias | from | to | action | by | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in shown:
        cells = [
            str(e["seq"]),
            e["time"][:19].replace("T", " "),
            e["alias"],
            f"v{e['from_version']}" if e["from_version"] else "-",
            f"v{e['to_version']}",
            e["action"],
            e["by"],
            e["reason"],
        ]
        lines.append(
            "| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |"
        )
    return "\n".join(lines)


def with_history(description: str, entries: list[dict[str, Any]]) -> str:
    """``description`` with its history section replaced by the latest moves."""
    base = (description or "").split(f"\n\n{HISTORY_HEADING}", 1)[0].rstrip()
    if not entries:
        return base
    return f"{base}\n\n{HISTORY_HEADING}\n\n{history_text(entries, DESCRIBED_MOVES)}"


def describe_history(client: Any, name: str, entries: list[dict[str, Any]]) -> None:
    current = client.get_registered_model(name).description or ""
    wanted = with_history(current, entries)
    if wanted != current:
        fencing.check()
        client.update_registered_model(name, description=wanted)


def holder_at(entries: list[dict[str, Any]], alias: str, when: str) -> dict[str, Any] | None:
    """The move that made the version holding ``alias`` at ``when`` (ISO date or time, UTC)."""
    try:
        moment = datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        raise PipelineError(
            f"--at must be a date or time like 2026-03-03 or 2026-03-03T12:00, got {when!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if len(when) == 10:  # a whole day: who held it at its end
        moment = moment.replace(hour=23, minute=59, second=59, microsecond=999999)
    held = None
    for entry in entries:
        if entry["alias"] != alias:
            continue
        if datetime.fromisoformat(entry["time"].replace("Z", "+00:00")) <= moment:
            held = entry
    return held


def history(
    store: ObjectStore,
    root: str,
    name: str,
    *,
    client: Any | None = None,
    at: str | None = None,
    alias: str = "champion",
) -> dict[str, Any]:
    """Every recorded move of ``name``'s aliases; with ``at``, the move in force then. Also says
    where MLflow's aliases disagree with the record (never changes anything)."""
    ledger = alias_ledger(store, root, name)
    entries = ledger.entries()
    result: dict[str, Any] = {"model": name, "moves": entries}
    if client is not None:
        disagree = {}
        for each in ALIASES:
            latest = _latest(entries, each)
            found = _current(client, name, each)
            if latest is not None and str(latest["to_version"]) != found:
                disagree[each] = {"recorded": latest["to_version"], "in_mlflow": found}
        result["disagreements"] = disagree
    if at is not None:
        result["at"] = at
        result["held"] = holder_at(entries, alias, at)
    return result


def model_version(client: Any, name: str, version: str | int) -> Any:
    """The version, or one clear error naming the versions there are."""
    from mlflow.exceptions import MlflowException

    from ml import mlflow_access

    text = str(version)
    if not text.isdigit() or int(text) < 1:
        raise PipelineError(f"--to/--version must be a version number like 3, got {version!r}")
    try:
        return client.get_model_version(name, text)
    except MlflowException as exc:
        if not (mlflow_access.missing(exc) or mlflow_access.denied(exc)):
            raise
    found = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    there = ", ".join(f"v{v}" for v in found) or "none"
    raise PipelineError(f"{name} has no version {text} (its versions: {there})")


def rollback(
    name: str,
    to_version: str | int,
    reason: str,
    *,
    root: str,
    store: ObjectStore | None = None,
    client: Any | None = None,
    by: str = "",
) -> dict[str, Any]:
    """Move ``champion`` to an earlier (or any) version, recorded like every other move."""
    from ml import mlflow_access

    check_name(name, "model_name")
    reason = check_reason(reason)
    client = mlflow_access.checked_client(client)
    target = model_version(client, name, to_version)
    store = store or ObjectStore()
    ledger = alias_ledger(store, root, name)
    current = _current(client, name, "champion")
    if current == str(target.version):
        raise PipelineError(f"v{target.version} is already the champion of {name}; nothing to do")
    entry = move_alias(
        client, ledger, name, "champion", target.version, action="rollback", reason=reason, by=by
    )
    return {"model": name, "champion_version": int(target.version), "move": entry}
