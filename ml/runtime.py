"""Where a training process runs: its rank among torchrun's processes, its device, its seeds.

One helper reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (or runs as one process),
picks the device through :func:`choose_device` (a pure decision, testable without a GPU), and
sets the process group up with a deliberate collective timeout: rank 0 alone evaluates, uploads
checkpoints and exports the model while the other ranks wait, so the timeout must cover that.

Usage: ``rt = setup_runtime("auto", timeout_minutes=60)``; ``rt.device``, ``rt.main``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

from ml.errors import PipelineError

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
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
        )
    return Runtime(rank, world, local_rank, device)


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


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every random stream training draws from, to save in a checkpoint."""
    kind, keys, pos, has_gauss, cached = cast(tuple[Any, ...], np.random.get_state())
    state: dict[str, Any] = {
        # plain lists and tensors only: checkpoints load with weights_only=True
        "python": list(random.getstate()),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Put back what :func:`rng_state` saved (streams absent from it are left alone)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, saved in state.get("generators", {}).items():
        if name in generators:
            generators[name].set_state(saved)
