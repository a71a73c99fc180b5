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
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import pandas as pd
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

from ml.errors import PipelineError
from ml.uri import S3Uri

log = logging.getLogger(__name__)

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
    return boto3.session.Session().client("s3", region_name=region, config=config)


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


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
        raise PipelineError(f"could not {action} {uri}: {code or exc}") from exc
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
        raise PipelineError(f"could not {action} {uri}: {exc}") from exc


class ObjectStore:
    """Small typed facade over one shared boto3 client (thread-safe, pooled)."""

    def __init__(self, client: Any | None = None, *, max_pool_connections: int = 64) -> None:
        self.client = client if client is not None else make_s3_client(max_pool_connections)

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

    def get_bytes(self, uri: S3Uri) -> bytes:
        with store_errors("read", uri):
            body: bytes = self.client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
            return body

    def exists(self, uri: S3Uri) -> bool:
        with store_errors("check", uri):
            try:
                self.client.head_object(Bucket=uri.bucket, Key=uri.key)
            except ClientError as exc:
                if _code(exc) in _MISSING_CODES:
                    return False
                raise
            return True

    def put_bytes(
        self,
        uri: S3Uri,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_absent: bool = False,
    ) -> bool:
        """Write ``data``; with ``if_absent`` never overwrite. Returns whether it was written."""
        with store_errors("write", uri):
            kwargs: dict[str, Any] = {
                "Bucket": uri.bucket,
                "Key": uri.key,
                "Body": data,
                "ContentType": content_type,
            }
            if not if_absent:
                self.client.put_object(**kwargs)
                return True
            try:
                self.client.put_object(IfNoneMatch="*", **kwargs)
            except ClientError as exc:
                code = _code(exc)
                if code in _EXISTS_CODES:
                    return False
                if code != "NotImplemented":
                    raise
                # A store without conditional writes: a head check is the next best guard.
                if self.exists(uri):
                    return False
                self.client.put_object(**kwargs)
            return True

    def list_keys(self, prefix: S3Uri) -> list[str]:
        """Every key under ``prefix`` (paginated), sorted."""
        keys: list[str] = []
        with store_errors("list", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=prefix.bucket, Prefix=prefix.key.rstrip("/") + "/" if prefix.key else ""
            )
            for page in pages:
                keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def write_parquet(self, uri: S3Uri, frame: pd.DataFrame) -> None:
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        self.put_bytes(uri, buf.getvalue(), content_type="application/vnd.apache.parquet")

    def read_parquet(self, uri: S3Uri) -> pd.DataFrame:
        return pd.read_parquet(io.BytesIO(self.get_bytes(uri)))

    def write_json(self, uri: S3Uri, payload: Any) -> None:
        data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        self.put_bytes(uri, data, content_type="application/json")

    def read_json(self, uri: S3Uri) -> Any:
        return json.loads(self.get_bytes(uri))
