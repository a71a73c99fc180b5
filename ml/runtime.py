"""Where a training process runs: its rank among torchrun's processes, its device, its seeds.

One helper reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (or runs as one process),
picks the device through :func:`choose_device` (a pure decision, testable without a GPU), and
sets the process group up with a deliberate collective timeout: rank 0 alone evaluates, uploads
checkpoints and exports the model while the other ranks wait, so the timeout must cover that.

Usage: ``rt = setup_runtime("auto", timeout_minutes=60)``; ``rt.device``, ``rt.main``.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ml.cpus import available_cpus
from ml.errors import PipelineError
from ml.supervise import die_with_parent

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among ``world`` processes and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def choose_device(
    preference: str,
    *,
    local_rank: int = 0,
    cuda_available: Callable[[], bool] = torch.cuda.is_available,
) -> torch.device:
    """``auto`` (CUDA when a GPU is visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Asking for CUDA where none is visible is an error, never a silent CPU fallback.
    """
    preference = (preference or "auto").strip().lower()
    if preference not in DEVICES and not preference.startswith("cuda:"):
        raise PipelineError(f"device must be auto, cpu, cuda or cuda:N, got {preference!r}")
    if preference == "cpu":
        return torch.device("cpu")
    available = cuda_available()
    if preference.startswith("cuda") and not available:
        raise PipelineError(
            f"device {preference} was asked for but no GPU is visible; run on a GPU worker "
            "(check the NVIDIA driver and container toolkit) or choose device cpu"
        )
    if not available:
        return torch.device("cpu")
    if preference.startswith("cuda:"):
        return torch.device(preference)
    return torch.device("cuda", local_rank)


def setup_runtime(preference: str, *, timeout_minutes: float = 60.0) -> Runtime:
    """Read torchrun's environment (or run as one process), pick the device, join the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(preference, local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Training shapes are fixed (drop_last), so cuDNN's autotuner pays for itself.
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        die_with_parent()  # a rank ends with torchrun's agent, whatever ends the agent
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
        )
    return Runtime(rank, world, local_rank, device)


def teardown_runtime() -> None:
    """Leave the process group (a distributed run's last step on every rank)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def loader_workers(requested: int, world: int, cpus: int | None = None) -> int:
    """DataLoader workers per process: ``requested`` when it is 0 or more; for -1 (auto) the
    CPUs left after one per training process, shared among the ``world`` processes (at most
    8 each, where decoding stops paying)."""
    if requested >= 0:
        return requested
    cpus = available_cpus() if cpus is None else cpus
    return max(0, min(8, (cpus - world) // max(1, world)))


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (every device) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: each worker's own Python and NumPy streams.

    torch gives every worker its own seed (the loader's base seed plus the worker id); NumPy
    and ``random`` would otherwise repeat the parent's stream in every worker.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """One 63-bit seed per (seed, rank, epoch): distinct for every rank and every epoch."""
    digest = hashlib.sha256(f"{seed}/{rank}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seed_epoch(seed: int, rank: int, epoch: int, generators: dict[str, torch.Generator]) -> None:
    """Reseed every stream training draws from at the start of ``epoch``: Python, NumPy, torch
    (the current device's CUDA stream too) and the loaders' generators.

    An epoch's shuffling and augmentation depend only on (seed, rank, epoch), so a resumed
    training needs no saved random state (none is checkpointed: it would tie a checkpoint to
    the number of GPUs that wrote it), and every rank draws its own stream.
    """
    value = epoch_seed(seed, rank, epoch)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # CPU, and each CUDA device already initialized
    for offset, name in enumerate(sorted(generators)):
        generators[name].manual_seed(value + offset + 1)
