"""S3-compatible object storage: URIs, one shared boto3 client, and errors a user can act on.

Usage::

    store = ObjectStore()
    store.put_bytes(S3Uri.parse("s3://bucket/a/b.json"), b"{}")

The endpoint and credentials come from boto3's standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``); nothing here reads or logs a secret.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

from ml.errors import PipelineError
from ml.redact import get_logger, redact_text, redact_url
from ml.uri import S3Uri

if TYPE_CHECKING:  # pandas and pyarrow are imported where tables are read or written: the
    import pandas as pd  # store's users without them (the airflow image's store-init) need
    import pyarrow as pa  # only boto3

log = get_logger(__name__)

#: Checks every fenced write (and delete) passes first, called as ``check(idempotent=...)``.
#: :mod:`ml.fencing` adds its lease check here when it is imported, so a superseded attempt's
#: write raises; the store itself knows nothing of leases.
WRITE_CHECKS: list[Callable[..., None]] = []


def _before_write(*, idempotent: bool = False) -> None:
    for check in WRITE_CHECKS:
        check(idempotent=idempotent)


__all__ = ["ObjectStore", "S3Uri", "make_s3_client", "store_errors"]

_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_EXISTS_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def make_s3_client(max_pool_connections: int = 64) -> Any:
    """A thread-safe boto3 S3 client configured from the standard AWS environment."""
    config = Config(
        max_pool_connections=max(64, max_pool_connections),
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 4, "mode": "standard"},
        # Some S3-compatible servers reject or mangle the newer default checksums.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = _endpoint_setting()
    if endpoint is not None:
        try:
            parts = urlsplit(endpoint)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            _ = parts.port  # raises on a bad port
        except ValueError:
            valid = False
        if not valid:
            raise PipelineError(
                f"AWS_ENDPOINT_URL is {redact_url(endpoint)!r}, not an http(s) URL; set it to "
                "the S3 endpoint, for example http://localhost:9000, or unset it for AWS S3"
            )
    try:
        return boto3.session.Session().client("s3", region_name=region, config=config)
    except (ValueError, BotoCoreError) as exc:
        raise PipelineError(
            f"cannot set up the S3 client: {redact_text(str(exc))}; check AWS_ENDPOINT_URL, "
            "AWS_REGION and the AWS_* credentials"
        ) from None


def _endpoint_setting() -> str | None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def _endpoint() -> str:
    endpoint = _endpoint_setting()
    return redact_url(endpoint) if endpoint else "AWS S3"


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextmanager
def store_errors(action: str, uri: S3Uri) -> Iterator[None]:
    """Turn boto3 failures into one PipelineError that says what to do."""
    try:
        yield
    except ClientError as exc:
        code = _code(exc)
        if code == "NoSuchBucket":
            raise PipelineError(
                f"bucket '{uri.bucket}' does not exist at {_endpoint()}; create it "
                f"(for example: aws s3 mb s3://{uri.bucket}) or choose another store"
            ) from exc
        if code in _ACCESS_CODES:
            raise PipelineError(
                f"the object store refused to {action} {uri} ({code}); check "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from exc
        if code in _MISSING_CODES:
            raise PipelineError(f"{uri} does not exist; did an earlier stage run?") from exc
        raise PipelineError(f"could not {action} {uri}: {code or redact_text(str(exc))}") from exc
    except NoCredentialsError as exc:
        raise PipelineError(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from exc
    except EndpointConnectionError as exc:
        raise PipelineError(
            f"cannot reach the object store at {_endpoint()} to {action} {uri}; "
            "start it or set AWS_ENDPOINT_URL to where it runs"
        ) from exc
    except BotoCoreError as exc:
        raise PipelineError(f"could not {action} {uri}: {redact_text(str(exc))}") from exc


@contextmanager
def _parquet_errors(uri: S3Uri, data: bytes, hint: str) -> Iterator[None]:
    """A Parquet object that cannot be read becomes one clear error (pyarrow raises several
    types for a damaged file)."""
    try:
        yield
    except Exception as exc:
        reason = "it is empty" if not data else f"{type(exc).__name__}"
        raise PipelineError(
            f"{uri} is not a readable Parquet file ({reason}: truncated, or not written "
            f"by this pipeline); {hint or 'rerun the stage that writes it'}"
        ) from None


class ObjectStore:
    """Small typed facade over one shared boto3 client (thread-safe, pooled)."""

    def __init__(self, client: Any | None = None, *, max_pool_connections: int = 64) -> None:
        self.client = client if client is not None else make_s3_client(max_pool_connections)
        # New objects go through obstore's client when this store made its own boto3 client
        # (ml.fastput: a quarter of the CPU per PUT); an injected client is used for everything.
        self._fast_put: Any = None if client is None else False
        self._fast_lock = threading.Lock()

    def _fast(self) -> Any:
        """The fast PUT path (made on first use), or False where there is none."""
        if self._fast_put is None:
            with self._fast_lock:
                if self._fast_put is None:
                    from ml.fastput import FastPut

                    fast = FastPut.for_client(self.client, _endpoint_setting())
                    self._fast_put = fast or False
        return self._fast_put

    def check_bucket(self, uri: S3Uri) -> None:
        """Fail early, with a clear message, when the bucket is missing or unreachable."""
        with store_errors("open bucket of", uri):
            try:
                self.client.head_bucket(Bucket=uri.bucket)
            except ClientError as exc:
                if _code(exc) in {"404", "NoSuchBucket", "NotFound"}:
                    raise ClientError(
                        {"Error": {"Code": "NoSuchBucket", "Message": ""}}, "HeadBucket"
                    ) from exc
                raise

    def ensure_bucket(self, bucket: str) -> None:
        """Create ``bucket`` if it does not exist (demo and tests; deployments pre-create it)."""
        uri = S3Uri(bucket)
        with store_errors("create bucket", uri):
            try:
                self.client.head_bucket(Bucket=bucket)
            except ClientError:
                self.client.create_bucket(Bucket=bucket)

    def get_bytes(self, uri: S3Uri, *, max_bytes: int | None = None) -> bytes:
        """The object's bytes; with ``max_bytes``, refuse a larger object before reading it."""
        with store_errors("read", uri):
            response = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
            if max_bytes is not None and int(response.get("ContentLength", 0)) > max_bytes:
                response["Body"].close()
                raise PipelineError(f"{uri} is larger than the {max_bytes} bytes allowed for it")
            body: bytes = response["Body"].read()
            return body

    def get_with_etag(self, uri: S3Uri) -> tuple[bytes, str] | None:
        """The object's bytes and ETag (for a conditional write after it); None when absent."""
        with store_errors("read", uri):
            try:
                response = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
            except ClientError as exc:
                if _code(exc) in _MISSING_CODES:
                    return None
                raise
            return response["Body"].read(), str(response["ETag"])

    def exists(self, uri: S3Uri) -> bool:
        return self.etag(uri) is not None

    def etag(self, uri: S3Uri) -> str | None:
        """The object's ETag (one HEAD request); None when absent."""
        with store_errors("check", uri):
            try:
                response = self.client.head_object(Bucket=uri.bucket, Key=uri.key)
            except ClientError as exc:
                if _code(exc) in _MISSING_CODES:
                    return None
                raise
            return str(response["ETag"])

    def put_bytes(
        self,
        uri: S3Uri,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_absent: bool = False,
        if_match: str | None = None,
        fenced: bool = True,
    ) -> bool:
        """Write ``data``; with ``if_absent`` never overwrite, with ``if_match`` only over the
        object of that ETag. Returns whether it was written. Unless ``fenced`` is False, this
        process's attempt must still hold its lease (:data:`WRITE_CHECKS`, :mod:`ml.fencing`)."""
        if fenced:
            _before_write(idempotent=if_absent)
        with store_errors("write", uri):
            kwargs: dict[str, Any] = {
                "Bucket": uri.bucket,
                "Key": uri.key,
                "Body": data,
                "ContentType": content_type,
            }
            if if_match is not None:
                kwargs["IfMatch"] = if_match
            elif if_absent:
                fast = self._fast()
                written = fast.put_new(uri.bucket, uri.key, data, content_type) if fast else None
                if written is not None:
                    return bool(written)
                kwargs["IfNoneMatch"] = "*"
            else:
                self.client.put_object(**kwargs)
                return True
            try:
                self.client.put_object(**kwargs)
            except ClientError as exc:
                code = _code(exc)
                if code in _EXISTS_CODES:
                    return False
                if code != "NotImplemented" or if_match is not None:
                    raise
                # A store without conditional writes: a head check is the next best guard.
                if self.exists(uri):
                    return False
                kwargs.pop("IfNoneMatch")
                self.client.put_object(**kwargs)
            return True

    def delete(self, uri: S3Uri) -> None:
        """Remove an object (no error when it is already gone); fenced like a write."""
        _before_write()
        with store_errors("delete", uri):
            self.client.delete_object(Bucket=uri.bucket, Key=uri.key)

    def list_objects(self, prefix: S3Uri) -> list[tuple[str, int]]:
        """Every (key, size) under ``prefix`` (paginated), sorted by key."""
        found: list[tuple[str, int]] = []
        with store_errors("list", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=prefix.bucket, Prefix=prefix.key.rstrip("/") + "/" if prefix.key else ""
            )
            for page in pages:
                found.extend((item["Key"], int(item["Size"])) for item in page.get("Contents", []))
        return sorted(found)

    def list_keys(self, prefix: S3Uri) -> list[str]:
        """Every key under ``prefix`` (paginated), sorted."""
        return [key for key, _ in self.list_objects(prefix)]

    def write_parquet(self, uri: S3Uri, frame: pd.DataFrame | pa.Table) -> None:
        """A pandas frame (without its index) or an Arrow table as one Parquet object."""
        buf = io.BytesIO()
        if hasattr(frame, "to_parquet"):
            frame.to_parquet(buf, index=False)
        else:
            import pyarrow.parquet as pq

            pq.write_table(frame, buf)
        self.put_bytes(uri, buf.getvalue(), content_type="application/vnd.apache.parquet")

    def read_parquet(self, uri: S3Uri, *, hint: str = "") -> pd.DataFrame:
        """A Parquet object as a frame; one clear error when it is truncated or not Parquet."""
        import pandas as pd

        data = self.get_bytes(uri)
        with _parquet_errors(uri, data, hint):
            return pd.read_parquet(io.BytesIO(data))

    def read_table(self, uri: S3Uri, *, hint: str = "") -> pa.Table:
        """A Parquet object as an Arrow table (pandas is not loaded); errors as
        :meth:`read_parquet`'s."""
        from ml.tables import read

        data = self.get_bytes(uri)
        with _parquet_errors(uri, data, hint):
            return read(data)

    def write_json(self, uri: S3Uri, payload: Any) -> None:
        data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        self.put_bytes(uri, data, content_type="application/json")

    def read_json(self, uri: S3Uri, *, hint: str = "") -> Any:
        """A JSON object; one clear error when it is damaged."""
        data = self.get_bytes(uri)
        try:
            return json.loads(data)
        except ValueError:
            raise PipelineError(
                f"{uri} is not readable JSON (truncated, or not written by this pipeline); "
                f"{hint or 'rerun the stage that writes it'}"
            ) from None
