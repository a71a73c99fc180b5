"""The S3 client's own CPU per PUT: boto3 as ``ml.storage`` configures it, boto3 without payload
signing, and obstore's client as ``ml.fastput`` uses it, on the same objects.

A moto S3 server runs in its own process, so the figures are the client's alone: user+system
CPU of this process over ``--puts`` conditional PUTs of ``--size`` random bytes (an image's
size), from 16 threads, after 20 warm-up PUTs each.

Usage::

    .venv/bin/python -m benchmarks.s3_put_cost                 # 600 PUTs of 50 KB
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from benchmarks.download import free_port, wait_port


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, put: Callable[[str], object], puts: int) -> None:
    for i in range(20):
        put(f"warm/{name}/{i}")
    cpu, wall = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: put(f"{name}/{i}.jpg"), range(puts)))
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    print(f"| {name} | {1000 * cpu / puts:.2f} | {puts / wall:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--puts", type=int, default=600)
    parser.add_argument("--size", type=int, default=50_000, help="bytes per object")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench-secret",
            AWS_DEFAULT_REGION="us-east-1",
        )
        run(args.puts, os.urandom(args.size))
    finally:
        server.terminate()
        server.wait()


def run(puts: int, body: bytes) -> None:
    import boto3
    from botocore.config import Config

    from ml.fastput import FastPut
    from ml.storage import ObjectStore, make_s3_client

    store = ObjectStore()
    store.ensure_bucket("bench")
    ours = make_s3_client()
    plain = boto3.session.Session().client(
        "s3",
        config=ours.meta.config.merge(Config(s3={"payload_signing_enabled": False})),
    )
    fast = FastPut.for_client(ours, os.environ["AWS_ENDPOINT_URL"])
    assert fast is not None, "obstore is a dependency: bash scripts/setup"
    print(f"{puts} PUTs of {len(body):,} bytes, 16 threads, moto in its own process\n")
    print("| client | CPU ms per PUT | PUTs/s |")
    print("|---|---:|---:|")
    measure(
        "boto3, as ml.storage configures it",
        lambda key: ours.put_object(Bucket="bench", Key=key, Body=body, IfNoneMatch="*"),
        puts,
    )
    measure(
        "boto3, payload signing off",
        lambda key: plain.put_object(Bucket="bench", Key=key, Body=body, IfNoneMatch="*"),
        puts,
    )
    measure(
        "obstore, as ml.fastput uses it",
        lambda key: fast.put_new("bench", key, body, "image/jpeg"),
        puts,
    )


if __name__ == "__main__":
    main()
