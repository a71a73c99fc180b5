"""Forget an image on request: delete every stored copy, record the request, keep it out.

``forget(target, reason)`` finds the image by its URL or SHA-256 (:func:`ml.lineage.find_image`),
with its near-duplicates (the other members of its group in every split that holds it), and:

1. records the request in the append-only ledger ``audit/forget/`` (URLs, content and perceptual
   hashes, the reason, who asked, the model versions that trained on it; never the image);
2. deletes the stored images (``images/<sha>.jpg``) of every copy;
3. tags those model versions ``audit.contains_forgotten=true`` in MLflow.

The record comes first, so a request interrupted half-way is complete once run again. From then
on ingest leaves rows with a forgotten URL out (reason ``forgotten``), and the download skips
forgotten URLs and any fetched image whose content matches a forgotten one (the same bytes, or
the same picture within the near-duplicate distance), with manifest status ``forgotten``: a
re-published URL cannot bring the photo back.

Usage: ``forget("https://example.com/a.jpg", "owner asked", root="s3://bucket/prefix")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ml.audit import Ledger, actor, check_reason, now
from ml.containment import check_name
from ml.dedup import MAX_DISTANCE
from ml.errors import PipelineError
from ml.layout import StoreLayout
from ml.redact import get_logger, redact_url
from ml.storage import ObjectStore
from ml.uri import S3Uri

log = get_logger(__name__)

RETRAIN_HINT = (
    "retrain without it: trigger the image_sentiment DAG (Airflow UI, or `airflow dags trigger "
    "image_sentiment`); ingest and download leave forgotten images out"
)


def forget_ledger(store: ObjectStore, root: str | S3Uri) -> Ledger:
    layout = StoreLayout.parse(root)
    return Ledger(store, layout.forget_ledger)


@dataclass(frozen=True)
class Forgotten:
    """What the forget ledger keeps out: URLs (as redacted), content and perceptual hashes."""

    urls: dict[str, int]
    sha256s: dict[str, int]
    phashes: tuple[tuple[int, int], ...] = ()
    max_distance: int = MAX_DISTANCE

    @classmethod
    def load(cls, store: ObjectStore, root: str | S3Uri) -> Forgotten:
        urls: dict[str, int] = {}
        shas: dict[str, int] = {}
        phashes: list[tuple[int, int]] = []
        for entry in forget_ledger(store, root).entries():
            seq = int(entry["seq"])
            urls.update((u, seq) for u in entry.get("urls", []))
            shas.update((s, seq) for s in entry.get("sha256s", []))
            phashes.extend((int(p, 16), seq) for p in entry.get("phashes", []) if p)
        return cls(urls, shas, tuple(phashes))

    def __bool__(self) -> bool:
        return bool(self.urls or self.sha256s)

    def url(self, url: str) -> int | None:
        """The request that forgot ``url``, or None."""
        return self.urls.get(redact_url(url)) if self.urls else None

    def image(self, sha256: str, phash: str = "") -> int | None:
        """The request that forgot this content (same bytes, or a near-duplicate), or None."""
        if sha256 in self.sha256s:
            return self.sha256s[sha256]
        if phash and self.phashes:
            value = int(phash, 16)
            for known, seq in self.phashes:
                if (value ^ known).bit_count() <= self.max_distance:
                    return seq
        return None

    @staticmethod
    def message(seq: int) -> str:
        return f"forgotten on request #{seq} (python -m ml forget); not fetched or stored"


def forget(
    target: str,
    reason: str,
    *,
    root: str,
    name: str,
    store: ObjectStore | None = None,
    client: Any | None = None,
    by: str = "",
) -> dict[str, Any]:
    """Delete the image ``target`` (URL or SHA-256) and its near-duplicates from the store,
    record the request, tag the versions that trained on it; see the module's docstring."""
    from ml import mlflow_access
    from ml.lineage import find_image, versions_containing  # pandas: not in the download's path

    reason = check_reason(reason)
    check_name(name, "model_name")
    store = store or ObjectStore()
    layout = StoreLayout.parse(root)
    store.check_bucket(layout.root)
    found = find_image(store, root, target)
    if not (found.datasets or found.splits):
        raise PipelineError(
            f"no dataset under {root} holds an image with "
            f"{found.target if not found.urls else redact_url(found.target)}; give the URL "
            "exactly as the CSV has it, or the sha256 from a manifest (python -m ml lineage "
            "--image finds both)"
        )
    client = mlflow_access.checked_client(client)
    versions = versions_containing(client, store, root, name, found.sha256s)
    shas = sorted(s for s in found.sha256s if s)
    entry = forget_ledger(store, root).add(
        {
            "time": now(),
            "by": by or actor(""),
            "reason": reason,
            "request": found.target if not found.urls else redact_url(found.target),
            "urls": sorted(found.urls),
            "sha256s": shas,
            "phashes": sorted(found.phashes),
            "deleted": [layout.image(s).key for s in shas],
            "model_versions": versions,
        }
    )
    for sha in shas:
        store.delete(layout.image(sha))
    for item in versions:
        _tag_forgotten(client, name, str(item["version"]), int(entry["seq"]))
    log.info(
        "forgot %d stored images (%d URLs) on request #%s; %d model versions trained on them",
        len(shas),
        len(found.urls),
        entry["seq"],
        len(versions),
    )
    return {
        "request": entry["seq"],
        "deleted": entry["deleted"],
        "urls": entry["urls"],
        "sha256s": shas,
        "model_versions": versions,
        "retrain": RETRAIN_HINT,
    }


def _tag_forgotten(client: Any, name: str, version: str, seq: int) -> None:
    tags = client.get_model_version(name, version).tags or {}
    requests = [r for r in tags.get("audit.forget_requests", "").split(",") if r]
    if str(seq) not in requests:
        requests.append(str(seq))
    client.set_model_version_tag(name, version, "audit.contains_forgotten", "true")
    client.set_model_version_tag(name, version, "audit.forget_requests", ",".join(requests))
