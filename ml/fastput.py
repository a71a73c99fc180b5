"""New objects written through obstore's S3 client: the downloader's conditional image PUTs.

boto3 spends about 4.2 ms of CPU on each PUT of a 50 KB image (its event hooks, request
serialisation, signing and response parsing in Python); obstore's client (Rust) about 1.2 ms
(BENCHMARKS.md, "Download"). On two cores that difference is a fifth of the downloader's work.

The deployment's S3 settings stay boto3's: the endpoint and region are those the boto3 client
resolved (``AWS_ENDPOINT_URL``, ``AWS_REGION``, config files) and the credentials come from a
boto3 session (environment, profiles, roles, refreshed when they expire). :meth:`FastPut.put_new`
answers only what it is sure of: written, or already there. Anything else (the store down, a
refusal, a store without conditional writes) returns None and the caller takes boto3's path,
which decides and reports it as every other store error is reported.

Usage: ``FastPut.for_client(client, endpoint).put_new("bucket", "key", data, "image/jpeg")``.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from ml.redact import get_logger

log = get_logger(__name__)


class FastPut:
    """One obstore store per bucket, made on first use, shared by every thread."""

    def __init__(self, endpoint: str | None, region: str, credentials: Any) -> None:
        self.endpoint, self.region, self.credentials = endpoint, region, credentials
        self._stores: dict[str, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_client(cls, client: Any, endpoint: str | None) -> FastPut | None:
        """The fast path for ``client``'s store (``endpoint``: the one the deployment set, None
        for AWS S3), or None when obstore is missing or there are no credentials to sign with."""
        try:
            from obstore.auth.boto3 import Boto3CredentialProvider
        except ImportError:
            return None
        try:
            credentials = Boto3CredentialProvider(ttl=timedelta(minutes=5))
        except ValueError:  # no credentials: boto3's path says so in its own words
            return None
        return cls(endpoint, client.meta.region_name, credentials)

    def _store(self, bucket: str) -> Any:
        store = self._stores.get(bucket)  # every PUT asks: no lock once the store exists
        if store is not None:
            return store
        with self._lock:
            if bucket not in self._stores:
                from obstore.store import S3Store

                options: dict[str, Any] = {"connect_timeout": "5s", "timeout": "60s"}
                config: dict[str, Any] = {"region": self.region}
                if self.endpoint:
                    config["endpoint"] = self.endpoint
                    options["allow_http"] = self.endpoint.startswith("http://")
                self._stores[bucket] = S3Store(
                    bucket,
                    config=config,  # type: ignore[arg-type]
                    client_options=options,  # type: ignore[arg-type]
                    # Few and short: a failure here is retried by boto3's path anyway.
                    retry_config={"max_retries": 1, "retry_timeout": timedelta(seconds=10)},
                    credential_provider=self.credentials,
                )
            return self._stores[bucket]

    def put_new(self, bucket: str, key: str, data: bytes, content_type: str) -> bool | None:
        """True: written; False: an object was already at ``key`` (nothing written); None:
        anything else, for the caller to retry with boto3."""
        import obstore
        from obstore.exceptions import AlreadyExistsError

        try:
            obstore.put(
                self._store(bucket),
                key,
                data,
                mode="create",
                attributes={"Content-Type": content_type},
            )
        except AlreadyExistsError:
            return False
        except Exception as exc:  # any other outcome is boto3's to decide
            log.debug("fast PUT of %s failed (%s); retrying with boto3", key, type(exc).__name__)
            return None
        return True
