"""Training checkpoints: one folder per training, written beside the loop, never inside it.

The folder holds ``last.pt`` (everything a resume needs), ``best-e<N>.pt`` (the weights of the
best epoch so far, named by that epoch) and ``result.json`` once the run is finished. The best
file is written *before* the ``last.pt`` that names it, and older best files are removed only
after, so a kill between two writes can never leave a ``last.pt`` pointing at weights of
another epoch. Uploads run on a background thread (one at a time, in order); the bytes are
serialized first, on the caller's thread, so training may go on changing its tensors.

A checkpoint carries the training's identity (settings and split content) and the number of
processes; :meth:`Checkpoints.load` refuses one that does not match, with the reason.

Usage::

    checkpoints = Checkpoints(store, folder, identity, world=1)
    saved = checkpoints.load()            # None on a fresh start
    checkpoints.save(payload, best=(epoch, weights))
    checkpoints.wait()
"""

from __future__ import annotations

import io
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ml.errors import PipelineError
from ml.layout import CheckpointLayout
from ml.redact import get_logger
from ml.storage import ObjectStore, S3Uri
from ml.train_config import identity_changes

log = get_logger(__name__)


@dataclass
class TrainingState:
    """Where the loop stands; everything here is plain values (saved with the tensors)."""

    epoch: int = -1  # the last finished epoch
    best_metric: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    #: The training phase is over (last epoch, or early stop): a resume goes straight to test.
    finished: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def serialize(payload: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict (the model goes on training meanwhile)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


class Checkpoints:
    """The checkpoint folder of one training (see the module docstring)."""

    def __init__(
        self,
        store: ObjectStore,
        folder: S3Uri,
        identity: dict[str, Any],
        *,
        world: int = 1,
        forced: bool = False,
        background: bool = True,
    ) -> None:
        self.store, self.folder, self.identity = store, folder, identity
        self.world, self.forced, self.background = world, forced, background
        self.files = CheckpointLayout(folder)
        self.last = self.files.last
        self.result_uri = self.files.result
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None
        self._best_saved = -1

    # --- reading ------------------------------------------------------------------------

    def check(self, saved_identity: Any) -> None:
        """Refuse a checkpoint or result of a training with other settings or data."""
        changes = identity_changes(saved_identity, self.identity)
        if not changes:
            return
        shown = ", ".join(("split content" if c == "split_sha256" else c) for c in changes[:8])
        advice = (
            "give another --checkpoint folder, or delete this one to start over"
            if self.forced
            else "delete it to start over"
        )
        raise PipelineError(
            f"{self.folder} holds a training with other settings or data (differs in: "
            f"{shown}); {advice}"
        )

    def result(self) -> dict[str, Any] | None:
        """The finished training's result, or None (checked against this identity)."""
        if not self.store.exists(self.result_uri):
            return None
        result: dict[str, Any] = self.store.read_json(self.result_uri)
        self.check(result.pop("identity", None))
        return result

    def load(self) -> dict[str, Any] | None:
        """``last.pt`` (checked), or None on a fresh start."""
        saved = self._read(self.last)
        if saved is None:
            return None
        self.check(saved.get("identity"))
        if int(saved.get("world_size", 1)) != self.world:
            raise PipelineError(
                f"{self.folder} was trained with {saved.get('world_size')} process(es), this "
                f"run has {self.world}: resume with the same number (torchrun --nproc-per-node "
                f"{saved.get('world_size')}), or delete the folder to start over"
            )
        self._best_saved = int(saved["state"]["best_epoch"])
        return saved

    def best_weights(self, saved: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The weights of the best epoch that ``saved`` (a ``last.pt``) names."""
        best = self._read(self.folder.child(saved["best_file"]))
        if best is None:
            raise PipelineError(
                f"{self.folder} names {saved['best_file']}, which is missing; delete the "
                "folder to train again"
            )
        weights: dict[str, torch.Tensor] = best["model"]
        return weights

    def _read(self, uri: S3Uri) -> dict[str, Any] | None:
        if not self.store.exists(uri):
            return None
        try:
            # weights_only: tensors and plain values; never unpickle arbitrary objects.
            state = torch.load(
                io.BytesIO(self.store.get_bytes(uri)), map_location="cpu", weights_only=True
            )
        except Exception as exc:  # truncated, foreign or unpicklable: all mean "not ours"
            raise PipelineError(
                f"checkpoint {uri} cannot be read ({type(exc).__name__}); delete it (or its "
                "folder) to start this training over"
            ) from None
        if not isinstance(state, dict) or "model" not in state:
            raise PipelineError(f"{uri} is not a checkpoint of this pipeline; delete it")
        return state

    # --- writing ------------------------------------------------------------------------

    def save(
        self, payload: dict[str, Any], best: tuple[int, dict[str, torch.Tensor]] | None
    ) -> None:
        """Queue ``payload`` as ``last.pt``, after the best weights when they are new.

        ``best`` is (epoch, CPU weights) of the best epoch so far.
        """
        self.wait()
        jobs: list[tuple[S3Uri, bytes]] = []
        best_epoch = best[0] if best else int(payload["state"]["best_epoch"])
        if best is not None and best[0] != self._best_saved:
            jobs.append((self.best_uri(best[0]), serialize({"model": best[1], "epoch": best[0]})))
        payload = {
            **payload,
            "identity": self.identity,
            "world_size": self.world,
            "best_file": self.best_uri(best_epoch).key.rsplit("/", 1)[1],
        }
        jobs.append((self.last, serialize(payload)))

        def upload() -> None:
            try:
                for uri, data in jobs:
                    self.store.put_bytes(uri, data)
                self._best_saved = best_epoch
                self._remove_stale_best(keep=best_epoch)
            except BaseException as exc:  # reported by the next save or wait
                self._error = exc

        if self.background:
            self._pending = threading.Thread(target=upload, name="checkpoint-upload")
            self._pending.start()
        else:
            upload()
            self._raise()

    def wait(self) -> None:
        """Block until the queued upload is done; raise its error, if any."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def write_result(self, result: dict[str, Any]) -> None:
        self.wait()
        self.store.write_json(self.result_uri, {**result, "identity": self.identity})

    def best_uri(self, epoch: int) -> S3Uri:
        return self.files.best(epoch)

    def _remove_stale_best(self, keep: int) -> None:
        for key in self.store.list_keys(self.folder):
            epoch = CheckpointLayout.best_epoch(key)
            if epoch is not None and epoch != keep:
                self.store.delete(S3Uri(self.folder.bucket, key))
