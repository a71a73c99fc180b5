"""The seed's approach, kept as a baseline: one thread per URL, requests + boto3, no limits.

Usage: python -m benchmarks.naive_download URLS.txt s3://BUCKET/PREFIX
"""

from __future__ import annotations

import io
import sys
import threading

import boto3
import requests
from botocore.config import Config
from PIL import Image


def main() -> int:
    urls = open(sys.argv[1]).read().split()
    bucket, _, prefix = sys.argv[2].removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", config=Config(max_pool_connections=64))
    ok = [0]
    lock = threading.Lock()

    def fetch(i: int, url: str) -> None:
        try:
            body = requests.get(url, timeout=30).content
            image = Image.open(io.BytesIO(body)).convert("RGB")
            scale = 256 / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=90)
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{i}.jpg", Body=out.getvalue())
            with lock:
                ok[0] += 1
        except Exception as exc:
            print(f"{url}: {exc}", file=sys.stderr)

    threads = [threading.Thread(target=fetch, args=(i, u)) for i, u in enumerate(urls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(ok[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
