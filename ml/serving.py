"""The registered model: what ``models:/image-sentiment@champion`` loads, on a CPU or a GPU.

It is logged with MLflow's *models from code* (no pickled object): the weights are a plain
``state_dict`` (loaded with ``weights_only=True``), ``model.json`` names the architecture, the
labels and the :class:`~ml.transforms.Preprocessing`, and the ``ml`` package travels with the
model as code. The device is chosen when the model is loaded, never when it was trained: CUDA
when a GPU is visible (or ``model_config={"device": "cpu"|"cuda"|"cuda:N"}``), and the weights
are moved there, so a model trained anywhere serves anywhere.

**Input**: a column ``image`` of encoded images (JPEG, PNG, WebP or GIF; bytes, or base64 text
as JSON carries them), any size. Each passes the download stage's checks (format from the
bytes, pixel, scan and decode-memory limits), is stored-size normalized as training data was,
and gets the evaluation preprocessing. A float32 array (N, 3, H, W) in [0, 1] is accepted too.
**Output**: one row per input: ``label``, ``confidence``, ``p_<class>`` for each of the five
classes, ``status`` (``ok`` or why the image was refused) and ``error``. A refused image's label,
confidence and probabilities are None (``null`` in a served answer, which stays strict JSON).

Usage::

    model = mlflow.pyfunc.load_model("models:/image-sentiment@champion")
    model.predict(pd.DataFrame({"image": [open("cat.jpg", "rb").read()]}))

    # served: python -m ml serve --model models:/image-sentiment@champion --port 5001
    printf '{"dataframe_split": {"columns": ["image"], "data": [["%s"]]}}' \\
        "$(base64 -w0 cat.jpg)" | curl -s localhost:5001/invocations \\
        -H 'Content-Type: application/json' --data-binary @-
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc.model import PythonModel

from ml.imaging import ImageConfig, normalize_image
from ml.model import Classifier, architecture
from ml.params import PARAMETERS
from ml.runtime import choose_device
from ml.statuses import Rejected, Status
from ml.transforms import Preprocessing, decode

#: The models-from-code script MLflow runs to build the model (it calls ``set_model``).
ENTRY = Path(__file__).with_name("_served_model.py")
PACKAGE = Path(__file__).parent
IMAGE_COLUMN = "image"
#: Images classified per forward pass.
BATCH: int = PARAMETERS["inference_batch_size"].default


def probability_column(label: str) -> str:
    return "p_" + label.lower().replace(" ", "_")


def output_columns(labels: Sequence[str]) -> list[str]:
    return ["label", "confidence", *(probability_column(x) for x in labels), "status", "error"]


Forward = Callable[[torch.Tensor], np.ndarray]


def network_forward(classifier: Classifier, device: torch.device) -> Forward:
    """Class probabilities from a float batch in [0, 1], on ``device``."""
    classifier = classifier.to(device).eval()

    def forward(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(classifier(batch.to(device)).float().cpu().numpy())

    return forward


@contextlib.contextmanager
def penultimate_features(model: Any) -> Iterator[list[np.ndarray] | None]:
    """While inside, every forward pass of a registered model's network appends the inputs of
    its last layer (the penultimate features, one row per image) to the yielded list; None
    when the model is not one whose network can be reached (a version logged before)."""
    python_model = getattr(model, "unwrap_python_model", lambda: None)()
    network = getattr(python_model, "network", None)
    last = getattr(getattr(network, "model", None), "fc", None)
    if last is None:
        yield None
        return
    captured: list[np.ndarray] = []

    def hook(module: Any, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        captured.append(inputs[0].detach().float().cpu().numpy())

    handle = last.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


class ImageClassifier:
    """Encoded images in, one row of label and probabilities out (shared by the served model,
    ``predict`` and the promotion's scoring of the champion). ``forward`` maps a float batch
    in [0, 1] (N, 3, H, W) to class probabilities."""

    def __init__(
        self,
        forward: Forward,
        preprocessing: Preprocessing,
        labels: Sequence[str],
        image: ImageConfig | None = None,
    ) -> None:
        self.forward = forward
        self.preprocessing = preprocessing
        self.labels = list(labels)
        self.image = image or ImageConfig()
        self._prepare = preprocessing.eval_transform()

    def images(self, values: Sequence[Any]) -> pd.DataFrame:
        """Rows for encoded images (bytes, or base64 text)."""
        tensors: dict[int, torch.Tensor] = {}
        statuses = [Status.OK.value] * len(values)
        errors = [""] * len(values)
        for i, value in enumerate(values):
            try:
                stored = normalize_image(_as_bytes(value), self.image)
                tensors[i] = self._prepare(decode(stored.data))
            except Rejected as exc:
                statuses[i], errors[i] = exc.status.value, str(exc)
        probs = np.full((len(values), len(self.labels)), np.nan, dtype=np.float32)
        ready = sorted(tensors)
        for start in range(0, len(ready), BATCH):
            chunk = ready[start : start + BATCH]
            batch = torch.stack([tensors[i] for i in chunk]).float().div_(255.0)
            probs[chunk] = self.forward(batch)
        return self.frame(probs, statuses, errors)

    def tensors(self, array: np.ndarray) -> pd.DataFrame:
        """Rows for float RGB in [0, 1], shape (N, 3, H, W), already preprocessed."""
        probs = self.forward(torch.from_numpy(np.asarray(array, dtype=np.float32)))
        return self.frame(probs, [Status.OK.value] * len(probs), [""] * len(probs))

    def frame(self, probs: np.ndarray, statuses: list[str], errors: list[str]) -> pd.DataFrame:
        has = ~np.isnan(probs[:, 0]) if len(probs) else np.zeros(0, dtype=bool)
        best = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
        out = pd.DataFrame(
            {
                "label": [
                    self.labels[int(b)] if ok else None for b, ok in zip(best, has, strict=True)
                ],
                "confidence": probs.max(axis=1) if len(probs) else [],
            }
        )
        for j, label in enumerate(self.labels):
            out[probability_column(label)] = probs[:, j] if len(probs) else []
        out["status"] = statuses
        out["error"] = errors
        return out[output_columns(self.labels)]


#: What each served column holds, in words (the signature gives names and types).
COLUMN_MEANINGS = {
    IMAGE_COLUMN: "an encoded JPEG, PNG, WebP or GIF of any size; base64 text in JSON",
    "label": "the predicted class; null when the image was refused",
    "confidence": "the predicted class's probability",
    "status": "ok, or why the image was refused, as in the download manifest",
    "error": "what was wrong with a refused image",
}


def describe_signature(signature: Any) -> str:
    """A model signature in words: each input and output column with its type (and meaning)."""

    def columns(schema: Any) -> str:
        parts = []
        for column in schema.to_dict():
            name, kind = column.get("name", "?"), column.get("type", "tensor")
            meaning = COLUMN_MEANINGS.get(name) or (
                "the probability of this class" if str(name).startswith("p_") else ""
            )
            parts.append(f"{name} ({kind}{': ' + meaning if meaning else ''})")
        return "; ".join(parts)

    text = f"Input: {columns(signature.inputs)}."
    if signature.outputs is not None:
        text += f" Output, one row per input: {columns(signature.outputs)}."
    return text


def with_nulls(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with None where a value is missing (a refused image's label and
    probabilities), so a served answer is strict JSON (``null``, never ``NaN``); columns with
    nothing missing keep their types."""
    missing = [c for c in frame.columns if frame[c].isna().any()]
    if not missing:
        return frame
    out = frame.copy()
    for column in missing:
        values = frame[column].astype(object)
        out[column] = values.where(frame[column].notna(), None)
    return out


def _as_bytes(value: Any) -> bytes:
    """An input cell as bytes: bytes as they are, text as base64 (what JSON carries)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value.strip(), validate=False)
        except (binascii.Error, ValueError):
            raise Rejected(Status.NOT_IMAGE, "the text is not base64 of an image") from None
    raise Rejected(
        Status.NOT_IMAGE, f"expected image bytes or base64 text, got {type(value).__name__}"
    )


def image_values(model_input: Any) -> list[Any] | None:
    """The images of an input (a frame's ``image`` column, a series or a list), or None."""
    if isinstance(model_input, pd.DataFrame):
        column = IMAGE_COLUMN if IMAGE_COLUMN in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, pd.Series | list | tuple):
        return list(model_input)
    if isinstance(model_input, np.ndarray) and model_input.ndim == 1:
        return list(model_input)
    return None


class SentimentModel(PythonModel):
    """The pyfunc behind the registered model; ``decide`` picks the device (injectable)."""

    #: The logged signature is this model's schema, not predict's type hints.
    _skip_type_hint_validation = True

    def __init__(self, decide: Callable[[str], torch.device] = choose_device) -> None:
        self._decide = decide
        self.model: ImageClassifier | None = None
        self.device = torch.device("cpu")
        self.config: dict[str, Any] = {}

    def load_context(self, context: Any) -> None:
        self.config = json.loads(Path(context.artifacts["config"]).read_text())
        preference = str((context.model_config or {}).get("device", "auto"))
        self.device = device = self._decide(preference)
        preprocessing = Preprocessing.from_dict(self.config["preprocessing"])
        classifier = Classifier(
            architecture(self.config["arch"], len(self.config["labels"])),
            preprocessing.mean,
            preprocessing.std,
        )
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        classifier.load_state_dict(state)
        self.network = classifier.to(device).eval()
        self.model = ImageClassifier(
            network_forward(self.network, device), preprocessing, self.config["labels"]
        )

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        if self.model is None:
            raise RuntimeError("the model was not loaded (load_context was not called)")
        if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
            return self.model.tensors(model_input)
        values = image_values(model_input)
        if values is None:
            raise ValueError(
                f"expected a column '{IMAGE_COLUMN}' of encoded images, or a float array "
                "(N, 3, H, W)"
            )
        return with_nulls(self.model.images(values))


def export(classifier: Classifier, folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Write the artifacts :class:`SentimentModel` loads; returns MLflow's ``artifacts`` map."""
    weights, manifest = folder / "weights.pt", folder / "model.json"
    state = {k: v.detach().to("cpu").contiguous() for k, v in classifier.state_dict().items()}
    torch.save(state, weights)
    manifest.write_text(json.dumps(config, indent=2))
    return {"weights": str(weights), "config": str(manifest)}
