"""The GPU path on the CPU: torchrun's process tree under a task, per-rank random streams,
precision fallback, out-of-memory, loader workers, and the GPU check script's smoke run.

torchrun runs here for real with two gloo ranks; what only CUDA can show is listed in
BENCHMARKS.md ("GPU check") and run by ``python -m benchmarks.gpu_check`` on a GPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ml.errors import ParameterError
from ml.loop import effective_precision, make_step, precision_note
from ml.runtime import Runtime, loader_workers, seed_epoch
from ml.supervise import run_supervised
from ml.train_config import TrainConfig

REPO = Path(__file__).resolve().parent.parent

# Each rank seeds epoch 2 as the trainer does, reports its draws in one write (short lines
# from two processes on one pipe never interleave), then waits to be ended.
RANK = """
import json, os, random, time
import numpy as np, torch
from ml.runtime import seed_epoch, setup_runtime
rt = setup_runtime("cpu")
generators = {"shuffle": torch.Generator()}
seed_epoch(7, rt.rank, 2, generators)
draws = [random.random(), float(np.random.rand()), torch.rand(1).item(),
         torch.rand(1, generator=generators["shuffle"]).item()]
report = {"rank": rt.rank, "world": rt.world, "pid": os.getpid(), "agent": os.getppid(),
          "draws": draws}
os.write(1, ("RANK " + json.dumps(report) + "\\n").encode())
time.sleep(600)
"""

# A stand-in for the Airflow task: supervises torchrun and writes every line it is passed
# to a file, so that the test can read the ranks' reports while it is being killed.
TASK = """
import sys
from ml.supervise import run_supervised
with open(sys.argv[1], "a", buffering=1) as out:
    code, _ = run_supervised(sys.argv[2:], on_line=lambda line: out.write(line + "\\n"))
    out.write(f"EXIT {code}\\n")
"""


def _launch(script: Path) -> list[str]:
    """The pipeline's launcher (``torchrun_command``'s first part) on a script of our own."""
    return [sys.executable, "-m", "ml.launch", "--standalone", "--nproc-per-node", "2", str(script)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _gone(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rindex(")") + 2 :].split()[0] == "Z"  # a zombie holds nothing


def _wait_until_gone(pids: list[int], seconds: float = 45.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(_gone(pid) for pid in pids):
        time.sleep(0.2)
    return [pid for pid in pids if not _gone(pid)]


def _reports(lines: list[str]) -> list[dict[str, Any]]:
    found = []
    for line in lines:
        if line.startswith("RANK {"):
            try:
                found.append(json.loads(line[5:]))
            except json.JSONDecodeError:  # not ours: a line some other process wrote
                continue
    return found


@pytest.fixture
def rank_script(tmp_path: Path) -> Path:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    return script


@pytest.fixture
def ranks_left() -> Iterator[list[int]]:
    """Pids a test saw; any still alive at the end are killed (and the test has failed)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


class _StopError(Exception):
    pass


@pytest.mark.slow
def test_a_failing_task_ends_torchrun_and_every_rank(
    rank_script: Path, ranks_left: list[int]
) -> None:
    """The task fails while training runs (here: its log handler raises): the agent and both
    ranks, each in a session of its own, are ended before the task returns. Both ranks drew
    their own streams, seeded from (seed, rank, epoch) alone."""
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if len(_reports(lines)) == 2:
            raise _StopError

    with pytest.raises(_StopError):
        run_supervised(_launch(rank_script), on_line, grace=20, env=_env())
    reports = sorted(_reports(lines), key=lambda r: r["rank"])
    pids = [r["pid"] for r in reports] + [reports[0]["agent"]]
    ranks_left.extend(pids)
    assert [r["rank"] for r in reports] == [0, 1] and reports[0]["world"] == 2
    assert reports[0]["agent"] == reports[1]["agent"]
    assert _wait_until_gone(pids, seconds=1) == []  # ended by the time the task returns

    assert reports[0]["draws"] != reports[1]["draws"]
    for report in reports:  # what a resumed epoch 2 draws on that rank, with no saved state
        import random

        import numpy as np

        generators = {"shuffle": torch.Generator()}
        seed_epoch(7, report["rank"], 2, generators)
        expected = [
            random.random(),
            float(np.random.rand()),
            torch.rand(1).item(),
            torch.rand(1, generator=generators["shuffle"]).item(),
        ]
        assert report["draws"] == pytest.approx(expected, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["task", "agent"])
def test_a_killed_task_or_agent_leaves_no_rank_running(
    rank_script: Path, tmp_path: Path, ranks_left: list[int], killed: str
) -> None:
    """SIGKILL gives no code a chance to clean up: the kernel ends the tree instead. A killed
    task takes torchrun's agent with it (the launcher dies with its parent) and the agent its
    ranks; a killed agent takes its ranks (each dies with its parent)."""
    task = tmp_path / "task.py"
    task.write_text(TASK)
    log = tmp_path / "task.log"
    process = subprocess.Popen(
        [sys.executable, str(task), str(log), *_launch(rank_script)], env=_env()
    )
    try:
        deadline = time.monotonic() + 180
        reports: list[dict[str, Any]] = []
        while len(reports) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            reports = _reports(log.read_text().splitlines()) if log.exists() else []
        assert len(reports) == 2, log.read_text() if log.exists() else "no output"
        agent = reports[0]["agent"]
        ranks = [r["pid"] for r in reports]
        ranks_left.extend([*ranks, agent])
        assert not any(_gone(pid) for pid in [*ranks, agent])

        os.kill(process.pid if killed == "task" else agent, signal.SIGKILL)
        assert _wait_until_gone([*ranks, agent]) == []
        if killed == "agent":  # the task sees torchrun fail, with the ranks' output so far
            assert process.wait(60) == 0
            assert "EXIT -9" in log.read_text()
        else:
            assert process.wait(10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()


# --------------------------------------------------------------------- precision fallback


def test_bf16_falls_back_to_fp16_with_loss_scaling_where_the_gpu_lacks_it() -> None:
    cuda = torch.device("cuda:0")
    assert effective_precision("bf16", cuda, bf16_supported=lambda d: True) == "bf16"
    assert effective_precision("bf16", cuda, bf16_supported=lambda d: False) == "fp16"
    assert effective_precision("fp16", cuda, bf16_supported=lambda d: False) == "fp16"
    assert effective_precision("fp32", cuda, bf16_supported=lambda d: False) == "fp32"
    assert effective_precision("bf16", torch.device("cpu")) == "fp32"
    note = precision_note("bf16", "fp16", cuda)
    assert "no native bf16" in note and "fp16 with loss scaling" in note
    assert precision_note("bf16", "bf16", cuda) == ""
    assert "fp32" in precision_note("bf16", "fp32", torch.device("cpu"))


def test_the_step_scales_the_loss_only_when_it_trains_in_fp16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scaler follows the precision really used: a bf16 request on a GPU without native
    bf16 gets one (checked through the decision; CUDA itself is not needed to build a step)."""
    import ml.loop

    model = torch.nn.Linear(4, 5)
    cfg = TrainConfig(split="s3://b/x", precision="bf16", max_steps_per_epoch=1)
    cuda = Runtime(0, 1, 0, torch.device("cuda:0"))
    seen: list[bool] = []

    class Scaler:
        def __init__(self, device: str, enabled: bool) -> None:
            seen.append(enabled)

    monkeypatch.setattr(ml.loop.torch.amp, "GradScaler", Scaler)
    for native in (True, False):
        monkeypatch.setattr(ml.loop, "native_bf16", lambda device, native=native: native)
        make_step(model, cfg, cuda, 1, normalizer=None)  # type: ignore[arg-type]
    assert seen == [False, True]


# ---------------------------------------------------------------------------- out of memory


def test_out_of_gpu_memory_fails_once_naming_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """No retry can help the same batch: one ParameterError (Airflow fails the run at once)
    that says what to lower; the process group is left either way."""
    import ml.train

    left: list[bool] = []

    def oom(*args: Any) -> dict[str, Any]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ml.train, "_fine_tune", oom)
    monkeypatch.setattr(ml.train, "teardown_runtime", lambda: left.append(True))
    cfg = TrainConfig(split="s3://b/d/splits/s/splits.parquet", batch_size=96, device="cpu")
    with pytest.raises(ParameterError, match=r"out of GPU memory .* batch_size 96") as info:
        ml.train.fine_tune(cfg)
    assert "lower batch_size (for example 48)" in str(info.value)
    assert left == [True]


# ---------------------------------------------------------------------------- loader workers


@pytest.mark.parametrize(
    ("requested", "world", "cpus", "expected"),
    [
        (4, 1, 2, 4),  # asked for: taken as is
        (0, 8, 64, 0),
        (-1, 1, 16, 8),  # auto: at most 8 per process
        (-1, 2, 16, 7),  # one CPU per training process, the rest shared
        (-1, 8, 16, 1),
        (-1, 1, 2, 1),
        (-1, 2, 2, 0),  # no CPU to spare: load in the training process
    ],
)
def test_loader_workers_follow_the_cpus_the_worker_has(
    requested: int, world: int, cpus: int, expected: int
) -> None:
    assert loader_workers(requested, world, cpus) == expected


# ------------------------------------------------------------------- the GPU check's smoke


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    """``gpu_check --smoke --device cpu``: every step the GPU run takes but CUDA itself:
    facts, trainer epochs eager and compiled, the served model loaded and compared, each
    throughput row, the JSON report."""
    from benchmarks import gpu_check

    out = tmp_path / "check.json"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["facts"]["bf16_runs_as"] == "fp32"
    for key in ("train_eager", "train_compile"):
        assert report[key]["finite"] and report[key]["weights_moved"], report[key]
    serving = report["serving"]
    assert serving["cpu"]["statuses"] == ["ok"] and serving["cpu"]["rows"] == 6
    assert serving["same_labels"] and serving["same_statuses"]
    assert len(serving["probability_columns"]) == 5 and serving["max_abs_difference"] < 1e-4
    modes = [(row["input"], row["mode"]) for row in report["throughput"]]
    assert len(modes) == 7 and len(set(modes)) == 7
    assert all(row["images_per_s"] > 0 for row in report["throughput"])
    assert any("TF32 for convolutions only" in mode for _, mode in modes)
    assert report["skipped"] == []


def test_rows_past_the_time_budget_are_skipped_and_named(tmp_path: Path) -> None:
    from benchmarks.train_throughput import Bench, Budget, bench_gpu

    budget = Budget(0)
    assert bench_gpu(tmp_path, Bench.smoke(), budget) == []
    assert len(budget.skipped) == 7 and budget.skipped[-1] == "trainer defaults"
    assert Budget(60).allows("a row")
