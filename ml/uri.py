"""``s3://bucket/key`` URIs; standard library only, so light modules can use them."""

from __future__ import annotations

from dataclasses import dataclass

from ml.errors import PipelineError


@dataclass(frozen=True)
class S3Uri:
    """A bucket and a key; ``str()`` gives ``s3://bucket/key``."""

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        """Parse ``s3://bucket/key``; raise PipelineError on anything else."""
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise PipelineError(f"expected an s3://BUCKET/PREFIX URI, got {uri!r}")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise PipelineError(f"no bucket in {uri!r}; expected s3://BUCKET/PREFIX")
        return cls(bucket, key.strip("/"))

    def child(self, *parts: str) -> S3Uri:
        """The URI of ``parts`` joined under this one."""
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        key = f"{self.key}/{tail}" if self.key and tail else (self.key or tail)
        return S3Uri(self.bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"
