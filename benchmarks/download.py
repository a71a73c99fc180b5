"""Download benchmark: our downloader vs one-thread-per-URL vs img2dataset, same URLs.

Prints images/s, CPU seconds per image and peak RSS for each, plus our peak RSS at two dataset
sizes (memory should stay flat). Everything runs on loopback: a moto S3 server and the local
image server (pre-made 30-150 KB JPEGs, each URL decoding to pixels of its own, so every
downloader stores one new object per URL; ``--latency-ms`` per answer) each in its own process,
so each downloader's CPU and memory are its own.

Usage::

    .venv/bin/python -m benchmarks.download                 # 2,000 images, 40 ms latency
    .venv/bin/python -m benchmarks.download --images 500 --skip-img2dataset --memory-sizes ""

img2dataset 1.47.0 is installed into ``.venv-img2dataset`` on first use (a few minutes); it runs
at its best settings on this machine (2 processes x 64 threads), once writing local files and
once writing to the same S3 endpoint as ours. ``--profile FILE`` runs our first download under
py-spy (every thread sampled; raw stacks to FILE) and prints where the samples fall;
``--phases`` instead counts its CPU stage by stage with each thread's own clock (a sampler also
counts threads waiting in native code).
``--rounds N`` (3 by default) then runs ours and img2dataset to local files N more times, taking
turns on new URLs, and prints the medians and the ratio of their CPU per image, round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ml.ingest import ingest
from ml.storage import ObjectStore, S3Uri

REPO = Path(__file__).resolve().parent.parent
I2D_VENV = REPO / ".venv-img2dataset"
MEASURE = """
import json, resource, subprocess, sys, time
cmd = json.loads(sys.argv[1])
start = time.monotonic()
done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
wall = time.monotonic() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": done.returncode, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
                  "rss_mb": usage.ru_maxrss / 1024, "stdout": done.stdout[-4000:],
                  "stderr": done.stderr[-4000:]}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listening on port {port}")


def process_cpu(pid: int) -> float:
    """CPU seconds (user and system) that process ``pid`` has spent so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(cmd: list[str], env: dict[str, str], endpoint: int | None = None) -> dict[str, Any]:
    """Run ``cmd`` with its whole process tree's CPU time and largest RSS recorded, and the CPU
    that the S3 endpoint (process ``endpoint``) spent meanwhile serving it."""
    before = process_cpu(endpoint) if endpoint else 0.0
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(cmd)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {result['stderr']}")
    if endpoint:
        result["endpoint_cpu"] = process_cpu(endpoint) - before
    return result


def figures(name: str, result: dict[str, Any], ok: int, n: int) -> dict[str, Any]:
    return {
        "approach": name,
        "images": n,
        "ok": ok,
        "wall_s": round(result["wall"], 2),
        "images_per_s": round(ok / result["wall"], 1),
        "cpu_ms_per_image": round(1000 * result["cpu"] / max(ok, 1), 2),
        "peak_rss_mb": round(result["rss_mb"], 1),
        "endpoint_cpu_ms_per_image": (
            round(1000 * result["endpoint_cpu"] / max(ok, 1), 2) if "endpoint_cpu" in result else ""
        ),
    }


def ensure_img2dataset() -> Path:
    binary = I2D_VENV / "bin" / "img2dataset"
    if not binary.exists():
        print("installing img2dataset 1.47.0 into .venv-img2dataset ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        pip = str(I2D_VENV / "bin" / "pip")
        subprocess.run([pip, "install", "-q", "img2dataset==1.47.0", "s3fs"], check=True)
    return binary


def run_ours(
    store: ObjectStore,
    bucket: str,
    urls: list[str],
    args: argparse.Namespace,
    env: dict[str, str],
    tmp: Path,
    tag: str,
    *,
    rerun: bool = False,
    first: bool = False,
) -> dict[str, Any]:
    """Our downloader on ``urls``; ``rerun``: again over the dataset stored before (nothing is
    missing, so nothing should be fetched); ``first``: the run that ``--profile`` and
    ``--phases`` look into."""
    csv = tmp / f"{tag}.csv"
    csv.write_text("url,label\n" + "".join(f"{u},Positive\n" for u in urls))
    dataset = ingest(str(csv), f"s3://{bucket}/{tag}", store=store).dataset
    cmd = [
        sys.executable,
        "-m",
        "ml",
        "-q",
        "download",
        "--dataset",
        dataset,
        "--allow-network",
        "127.0.0.0/8",
        "--download-concurrency",
        str(args.concurrency),
        "--per-host",
        str(args.concurrency),
    ]
    phases = tmp / f"{tag}-phases.json" if args.phases and first else None
    profile = Path(args.profile) if args.profile and first else None
    if phases:
        cmd[1:3] = ["-m", "benchmarks.cpu_phases"]
        env = {**env, "CPU_PHASES_OUT": str(phases)}
    if profile:  # py-spy samples every thread (cProfile sees only one)
        spy = [str(ensure_pyspy()), "record", "--format", "raw", "--rate", "250", "--nonblocking"]
        cmd = [*spy, "-o", str(profile), "--", *cmd]
    result = measure(cmd, env, args.endpoint)
    if phases:
        print_phases(json.loads(phases.read_text()), len(urls))
    # the summary is the last JSON line (py-spy adds lines of its own)
    summary = json.loads([ln for ln in result["stdout"].splitlines() if ln.startswith("{")][-1])
    if profile:
        print_profile(profile)
        return figures("ours, profiled (py-spy's own CPU included)", result, len(urls), len(urls))
    if rerun:
        fetched, stored = summary["downloaded"], summary["skipped_existing"]
        name = f"ours, rerun (fetched {fetched}, already stored {stored})"
        return figures(name, result, summary["skipped_existing"], len(urls))
    name = "ours, counted by stage (thread clocks)" if phases else "ours (python -m ml download)"
    name += f", {summary['stored_new']} new objects"  # the image server gives each URL its own
    return figures(name, result, summary["downloaded"], len(urls))


def run_img2dataset(
    store: ObjectStore,
    base: str,
    tmp: Path,
    args: argparse.Namespace,
    env: dict[str, str],
    *,
    targets: tuple[str, ...] = ("local files", "S3"),
    suffix: str = "",
) -> list[dict[str, Any]]:
    """img2dataset on the same kind of URLs, writing local files and then to our S3 endpoint.
    ``suffix`` makes the URLs and the output new (a repeated round fetches everything again)."""
    rows: list[dict[str, Any]] = []
    for target in targets:
        tag = ("i2d-local" if target == "local files" else "i2d") + suffix
        listing = tmp / f"{tag}.csv"
        listing.write_text("url\n" + "".join(f"{base}/{tag}/{i}.jpg\n" for i in range(args.images)))
        output = str(tmp / tag) if target == "local files" else f"s3://bench/{tag}"
        result = measure(
            img2dataset_command(listing, output, args),
            env,
            args.endpoint if target == "S3" else None,
        )
        if target == "local files":
            stored = [p.name for p in (tmp / tag).rglob("*.jpg")]
        else:
            stored = [k for k in store.list_keys(S3Uri("bench", tag)) if k.endswith(".jpg")]
        approach = (
            f"img2dataset 1.47.0, {args.i2d_processes} processes x {args.i2d_threads} threads, "
            f"to {target}"
        )
        rows.append(figures(approach, result, len(stored), args.images))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def rounds(
    store: ObjectStore, base: str, tmp: Path, args: argparse.Namespace, env: dict[str, str]
) -> list[dict[str, Any]]:
    """``--rounds`` more runs of ours and of img2dataset to local files, taking turns, each on
    new URLs; then the median of each and their ratio. This machine's speed drifts from one
    minute to the next by as much as the difference being measured, so a comparison is made
    within each round (same minute) and over several rounds."""
    if args.rounds < 1 or args.profile:
        return []
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    ratios: list[float] = []
    for number in range(1, args.rounds + 1):
        urls = [f"{base}/round{number}/{i}.jpg" for i in range(args.images)]
        ours.append(run_ours(store, "bench", urls, args, env, tmp, f"round{number}"))
        ours[-1]["approach"] = f"round {number}: {ours[-1]['approach']}"
        print(json.dumps(ours[-1]), flush=True)
        if not args.skip_img2dataset:
            theirs += run_img2dataset(
                store, base, tmp, args, env, targets=("local files",), suffix=f"-r{number}"
            )
            theirs[-1]["approach"] = f"round {number}: {theirs[-1]['approach']}"
            ratios.append(theirs[-1]["cpu_ms_per_image"] / ours[-1]["cpu_ms_per_image"])
    rows = [*ours, *theirs]
    for name, runs in (("ours", ours), ("img2dataset to local files", theirs)):
        if runs:
            rows.append(median_row(f"{name}, median of {len(runs)} rounds", runs))
            print(json.dumps(rows[-1]), flush=True)
    if ratios:
        print(
            "their CPU per image / ours, per round: "
            + ", ".join(f"{r:.2f}" for r in ratios)
            + f" (median {statistics.median(ratios):.2f})",
            flush=True,
        )
    return rows


def median_row(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over ``runs`` (figure by figure, so not one run's row)."""
    keys = ["images", "ok", "wall_s", "images_per_s", "cpu_ms_per_image", "peak_rss_mb"]
    row: dict[str, Any] = {"approach": name, "endpoint_cpu_ms_per_image": ""}
    if all(r["endpoint_cpu_ms_per_image"] != "" for r in runs):
        keys.append("endpoint_cpu_ms_per_image")
    return {**row, **{k: statistics.median(r[k] for r in runs) for k in keys}}


def print_phases(report: dict[str, Any], images: int) -> None:
    """benchmarks/cpu_phases.py's report as a table: CPU per image of each stage, and its
    share of the process's CPU."""
    process = report["process_user_s"] + report["process_system_s"]
    print(f"\nCPU by stage (thread clocks), {images} images")
    print("| stage | calls | CPU ms per image | share of the process |\n|---|---|---|---|")
    rows = [(name, s["calls"], s["cpu_s"]) for name, s in report["stages"].items()]
    rows += [
        ("imports (main thread, before any work)", 1, report["imports_s"]),
        (
            "main thread after the imports (records, pool loop, manifest)",
            1,
            report["main_thread_s"],
        ),
        ("garbage collection (any thread)", report["gc"]["calls"], report["gc"]["cpu_s"]),
        (
            f"process (user {report['process_user_s']:.2f} s, system "
            f"{report['process_system_s']:.2f} s)",
            1,
            process,
        ),
    ]
    for name, calls, seconds in rows:
        share = 100 * seconds / process
        print(f"| {name} | {calls} | {1000 * seconds / images:.2f} | {share:.0f} % |")


def ensure_pyspy() -> Path:
    """py-spy (a sampling profiler, a binary) in its own folder, installed on first use."""
    binary = REPO / ".venv-pyspy" / "bin" / "py-spy"
    if not binary.exists():
        pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(binary.parent.parent)]
        subprocess.run([*pip, "py-spy==0.4.2"], check=True)
    return binary


def print_profile(raw: Path, top: int = 25) -> None:
    """Where the samples of a py-spy raw profile fall: by the function running (self) and by
    every function on the stack (inclusive), as shares of the samples with a Python stack
    (threads in native code without one are left out)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():  # a frame name with a newline in it splits a line
            continue
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
    for title, table in (("self", own), ("inclusive", inclusive)):
        print(f"\n{title}: share of {total} samples with a Python stack")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"{100 * n / total:6.1f} %  {frame}")


def img2dataset_command(listing: Path, output: str, args: argparse.Namespace) -> list[str]:
    """img2dataset at its best settings here: one process per core, many threads each, resize
    the shorter side to 256 only when bigger (as ours stores), JPEG quality 90."""
    options = {
        "url_list": listing,
        "input_format": "csv",
        "url_col": "url",
        "output_format": "files",
        "output_folder": output,
        "processes_count": args.i2d_processes,
        "thread_count": args.i2d_threads,
        "resize_mode": "keep_ratio",
        "image_size": 256,
        "resize_only_if_bigger": True,
        "encode_quality": 90,
        "timeout": 10,
        "retries": 2,
        "enable_wandb": False,
        "number_sample_per_shard": 10000,
        "disallowed_header_directives": "[]",
    }
    command = [str(ensure_img2dataset())]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    return command


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=40.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--memory-sizes",
        default="1000,10000",
        help="dataset sizes for the flat-memory check ('' to skip)",
    )
    parser.add_argument("--skip-img2dataset", action="store_true")
    parser.add_argument("--i2d-processes", type=int, default=2, help="img2dataset's processes")
    parser.add_argument("--i2d-threads", type=int, default=64, help="img2dataset's threads each")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="profile our first run instead (py-spy, every thread; raw stacks to FILE)",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="count our first run's CPU by stage (thread clocks; benchmarks/cpu_phases.py)",
    )
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="further rounds of ours and img2dataset to local files, taking turns (0: none)",
    )
    parser.set_defaults(endpoint=None)  # main() sets the S3 endpoint's process id once it runs
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    s3_port, img_port = free_port(), free_port()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "WANDB_MODE": "disabled",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "PYTHONPATH": str(REPO),
    }
    os.environ.update(
        {
            k: env[k]
            for k in (
                "AWS_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION",
            )
        }
    )
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devkit",
                "-q",
                "imageserver",
                "--port",
                str(img_port),
                "--latency-ms",
                str(args.latency_ms),
                "--pool",
                "64",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    rows: list[dict[str, Any]] = []
    args.endpoint = servers[0].pid  # moto's CPU is counted around each run that writes to it
    try:
        wait_port(s3_port)
        wait_port(img_port)
        store = ObjectStore()
        store.ensure_bucket("bench")
        base = f"http://127.0.0.1:{img_port}"
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            urls = [f"{base}/main/{i}.jpg" for i in range(args.images)]
            rows.append(run_ours(store, "bench", urls, args, env, tmp, "ours", first=True))
            print(json.dumps(rows[-1]), flush=True)
            rows.append(run_ours(store, "bench", urls, args, env, tmp, "ours", rerun=True))
            print(json.dumps(rows[-1]), flush=True)
            if not args.skip_naive:
                listing = tmp / "naive.txt"
                listing.write_text("\n".join(f"{base}/naive/{i}.jpg" for i in range(args.images)))
                result = measure(
                    [
                        sys.executable,
                        str(REPO / "benchmarks" / "naive_download.py"),
                        str(listing),
                        "s3://bench/naive",
                    ],
                    env,
                    args.endpoint,
                )
                rows.append(
                    figures(
                        "one thread per URL (seed)",
                        result,
                        int(result["stdout"].split()[-1]),
                        args.images,
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
            if not args.skip_img2dataset:
                rows += run_img2dataset(store, base, tmp, args, env)
            rows += rounds(store, base, tmp, args, env)
            for size in [int(s) for s in args.memory_sizes.split(",") if s.strip()]:
                urls = [f"{base}/mem{size}/{i}.jpg" for i in range(size)]
                rows.append(run_ours(store, "bench", urls, args, env, tmp, f"mem{size}"))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for server in servers:
            server.terminate()
            server.wait()
    print(
        f"\n{args.images} images, {args.latency_ms:g} ms latency, concurrency "
        f"{args.concurrency}, {os.cpu_count()} CPUs\n"
    )
    print(
        "| approach | images | ok | wall s | images/s | CPU ms/image | peak RSS MB "
        "| S3 endpoint's CPU ms/image |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['approach']} | {r['images']} | {r['ok']} | {r['wall_s']} | "
            f"{r['images_per_s']} | {r['cpu_ms_per_image']} | {r['peak_rss_mb']} | "
            f"{r['endpoint_cpu_ms_per_image']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
