"""Every run parameter, declared once: name, type, default, range or choices, title, description.

The Airflow trigger form (``dags/``), the ``python -m ml`` options, the run settings'
validation (:mod:`ml.settings`) and the stage configurations (:class:`~ml.train_config.
TrainConfig`, the download limits) are all derived from :data:`PARAMETERS`, so a parameter has
one name everywhere and adding one is one entry here plus the code that uses it. Standard
library only: DAG files import this at parse time.

Usage::

    EPOCHS = PARAMETERS["epochs"]
    EPOCHS.check(value)              # the value, coerced, or ParameterError naming 'epochs'
    EPOCHS.json_schema()             # keyword arguments of an Airflow Param
    EPOCHS.field()                   # a dataclass field carrying the declaration
    add_options(parser, ["epochs", "batch_size"])   # --epochs, --batch-size
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ml.errors import ParameterError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
NAME_RULE = (
    "a name of at most 128 letters, digits, '_', '.' or '-' that starts with a letter or "
    "digit, for example image-sentiment"
)
RATIOS_PATTERN = r"^\s*[0-9.]+\s*,\s*[0-9.]+\s*,\s*[0-9.]+\s*$"
_TRUE, _FALSE = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")
_KIND_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


@dataclass(frozen=True)
class TextRule:
    """A rule for a text field, stated in words with an example (``expects``) and checked by
    a regular expression. A trigger form carries it as the JSON-schema ``format`` named by
    the words, which the API server checks (``plugins/form_rules.py`` registers every rule),
    so a refusal reads "'x' is not a '<the rule in words>'", never a regular expression."""

    pattern: str
    expects: str

    def matches(self, value: object) -> bool:
        return isinstance(value, str) and re.match(self.pattern, value) is not None

    def schema(self) -> dict[str, str]:
        return {"format": self.expects}


@dataclass(frozen=True)
class Parameter:
    """One run parameter. ``form`` puts it on the trigger form; ``env`` names the environment
    variable that sets the form's default (deployment configuration). A ``pattern`` comes with
    ``expects``, the same rule in words with an example, which messages show instead of the
    regular expression; ``required``: the command line must give it (no default)."""

    def __post_init__(self) -> None:
        if self.pattern and not self.expects:
            raise ValueError(f"parameter {self.name!r}: a pattern needs its rule in words")

    name: str
    kind: type
    default: Any
    title: str
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    pattern: str = ""
    expects: str = ""
    min_length: int = 0
    required: bool = False
    form: bool = True
    env: str = ""
    metavar: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def argv(self, value: Any) -> list[str]:
        """This parameter set to ``value`` on a ``python -m ml`` command line."""
        if self.kind is bool:
            return [self.flag if value else "--no-" + self.flag[2:]]
        return [self.flag, str(value)]

    def field(self) -> Any:
        """A dataclass field with this default that carries the declaration."""
        return dataclasses.field(default=self.default, metadata={"parameter": self})

    def default_for(self, env: Mapping[str, str] | None = None) -> Any:
        """The default, or the deployment's ``env`` override of it."""
        env = os.environ if env is None else env
        if self.env and env.get(self.env, "").strip():
            try:
                return self.check(env[self.env])
            except ParameterError as error:  # the deployment's setting: say which one
                raise ParameterError(f"{error} (set by {self.env} in the deployment)") from None
        return self.default

    def rule(self) -> str:
        """The allowed values in words, for messages."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.expects:
            return self.expects
        word = "above" if self.exclusive_minimum else "at least"
        low = "" if self.minimum is None else f"{word} {self.minimum:g}"
        high = "" if self.maximum is None else f"at most {self.maximum:g}"
        return " and ".join(p for p in (low, high) if p) or _KIND_WORDS[self.kind]

    def check(self, value: Any) -> Any:
        """``value`` coerced to this parameter's type and checked; ParameterError names it."""
        coerced = self._coerce(value)
        if self.choices and coerced not in self.choices:
            raise self._error(value, self.rule())
        if self.kind in (int, float):
            if not math.isfinite(coerced):
                raise self._error(value, "a finite number")
            low, high = self.minimum, self.maximum
            if low is not None and (coerced < low or (self.exclusive_minimum and coerced == low)):
                raise self._error(value, self.rule())
            if high is not None and coerced > high:
                raise self._error(value, self.rule())
        if self.kind is str and len(coerced) < self.min_length:
            raise self._error(value, "given (it cannot be empty)")
        if self.pattern and not re.match(self.pattern, str(coerced)):
            raise self._error(value, self.expects)
        return coerced

    def _coerce(self, value: Any) -> Any:
        if value is None:
            return self.default
        try:
            if self.kind is bool:
                if isinstance(value, bool):
                    return value
                text = str(value).strip().lower()
                if text in _TRUE or text in _FALSE:
                    return text in _TRUE
                raise ValueError(value)
            if self.kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                return int(str(value).strip()) if isinstance(value, str) else int(value)
            if self.kind is float:
                if isinstance(value, bool):
                    raise ValueError(value)
                return float(value)
            return str(value).strip()
        except (TypeError, ValueError):
            raise self._error(value, _KIND_WORDS[self.kind]) from None

    def _error(self, value: Any, rule: str) -> ParameterError:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        return ParameterError(f"parameter '{self.name}' must be {rule}, got {shown}")

    def json_schema(self) -> dict[str, Any]:
        """Keyword arguments of an Airflow ``Param`` (JSON schema) for the trigger form."""
        kinds = {bool: "boolean", int: "integer", float: "number", str: "string"}
        schema: dict[str, Any] = {"type": kinds[self.kind], "title": self.title}
        if self.description:
            schema["description"] = self.description
        if self.minimum is not None:
            schema["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.choices:
            schema["enum"] = list(self.choices)
        if self.pattern:
            schema.update(TextRule(self.pattern, self.expects).schema())
        if self.min_length:
            schema["minLength"] = self.min_length
        return schema

    def argparse_type(self) -> Any:
        def parse(text: str) -> Any:
            try:
                return self.check(text)
            except ParameterError as exc:
                raise argparse.ArgumentTypeError(str(exc).split(f"'{self.name}' ", 1)[-1]) from None

        parse.__name__ = self.kind.__name__
        return parse


def _p(name: str, kind: type, default: Any, title: str, **rest: Any) -> Parameter:
    return Parameter(name, kind, default, title, **rest)


_DECLARED = (
    # --- ingest -------------------------------------------------------------------------
    _p(
        "csv",
        str,
        "",
        "CSV",
        min_length=1,
        description="CSV of image URLs and labels: an "
        "http(s) URL, or an s3:// URI or path inside the input folders (ML_INPUT_ROOTS). The "
        "CrowdFlower export works as it is. Scheduled runs read the default, so keep the latest "
        "export there.",
    ),
    _p(
        "sample",
        int,
        0,
        "Sample size",
        minimum=0,
        env="ML_SAMPLE",
        description="Rows to keep, stratified by label; 0 keeps all.",
    ),
    _p(
        "min_confidence",
        float,
        0.0,
        "Minimum confidence",
        minimum=0,
        maximum=1,
        description="Drop rows whose label confidence is below this.",
    ),
    _p(
        "exclude_golden",
        bool,
        False,
        "Exclude golden rows",
        description="Drop CrowdFlower's test-question rows.",
    ),
    _p("seed", int, 0, "Seed", minimum=0, description="Seed for sampling, splitting and training."),
    # --- split --------------------------------------------------------------------------
    _p(
        "ratios",
        str,
        "0.8,0.15,0.05",
        "Split ratios",
        pattern=RATIOS_PATTERN,
        expects="three fractions train,valid,test separated by commas that sum to 1, "
        "for example 0.8,0.15,0.05",
        description="Fractions of the images for train, valid and test, separated by commas; "
        "they must sum to 1 (for example 0.8,0.15,0.05).",
    ),
    # --- download -----------------------------------------------------------------------
    _p(
        "download_concurrency",
        int,
        32,
        "Download threads per batch",
        minimum=1,
        maximum=512,
        description="Parallel downloads per batch (each host still gets at most the "
        "deployment's per-host connection limit).",
    ),
    _p(
        "download_batch_size",
        int,
        500,
        "URLs per download batch",
        minimum=1,
        description="URLs per mapped download batch; raised automatically to stay within "
        "1024 batches.",
    ),
    _p(
        "max_side",
        int,
        256,
        "Stored image size",
        minimum=0,
        maximum=4096,
        description="Shorter side of stored images at most (pixels); 0 keeps the original.",
    ),
    _p(
        "per_host",
        int,
        16,
        "Connections per host",
        minimum=1,
        maximum=512,
        form=False,
        description="Open connections per host at most.",
    ),
    _p(
        "connect_timeout",
        float,
        5.0,
        "Connect timeout",
        minimum=0,
        exclusive_minimum=True,
        form=False,
        metavar="S",
        description="Seconds to connect.",
    ),
    _p(
        "read_timeout",
        float,
        10.0,
        "Read timeout",
        minimum=0,
        exclusive_minimum=True,
        form=False,
        metavar="S",
        description="Seconds of silence allowed while reading.",
    ),
    _p(
        "deadline",
        float,
        30.0,
        "Deadline per image",
        minimum=0,
        exclusive_minimum=True,
        form=False,
        metavar="S",
        description="Total seconds per image: DNS, connect, TLS, "
        "headers, body, redirects, retries.",
    ),
    _p(
        "retries",
        int,
        2,
        "Retries",
        minimum=0,
        maximum=20,
        form=False,
        description="Extra attempts on timeouts, 408/425/429 and 5xx.",
    ),
    _p(
        "max_bytes",
        int,
        10 * 1024 * 1024,
        "Byte cap per image",
        minimum=1,
        form=False,
        description="Enforced while reading (default 10 MiB).",
    ),
    _p(
        "max_pixels",
        int,
        40_000_000,
        "Pixel cap per image",
        minimum=1,
        form=False,
        description="Refuse images whose header declares more pixels (default 40M).",
    ),
    _p(
        "flush_rows",
        int,
        200,
        "Manifest part size",
        minimum=1,
        form=False,
        description="Write a manifest part after this many results; a kill loses at most "
        "this many rows.",
    ),
    # --- train --------------------------------------------------------------------------
    _p(
        "split",
        str,
        "",
        "Split manifest",
        form=False,
        required=True,
        metavar="URI",
        description="The split manifest URI that the split stage printed.",
    ),
    _p(
        "arch",
        str,
        "resnet152",
        "Architecture",
        form=False,
        env="ML_ARCH",
        choices=("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
        description="torchvision ResNet depth (a deployment sets it with ML_ARCH).",
    ),
    _p(
        "weights",
        str,
        "IMAGENET1K_V2",
        "Initial weights",
        env="ML_WEIGHTS",
        description="IMAGENET1K_V2, IMAGENET1K_V1, a .pth file or s3:// URI inside the input "
        "folders, or none (random; tests and demos only). Named weights must be in the "
        "worker's cache or staged in the store.",
    ),
    _p(
        "weights_sha256",
        str,
        "",
        "Weights SHA-256",
        form=False,
        description="Expected SHA-256 (prefix) of the weights file.",
    ),
    _p(
        "download_weights",
        bool,
        False,
        "Download weights",
        form=False,
        description="Let torchvision download named weights (needs internet).",
    ),
    _p(
        "epochs",
        int,
        10,
        "Epochs",
        minimum=1,
        maximum=1000,
        description="Passes over the training images at most (early stopping may end sooner).",
    ),
    _p(
        "batch_size",
        int,
        64,
        "Batch size",
        minimum=1,
        maximum=4096,
        description="Images per step and process.",
    ),
    _p(
        "learning_rate",
        float,
        0.01,
        "Learning rate",
        minimum=0,
        maximum=10,
        exclusive_minimum=True,
        description="Peak rate for the global batch (batch size x "
        "processes); not rescaled for more GPUs.",
    ),
    _p(
        "optimizer",
        str,
        "sgd",
        "Optimizer",
        choices=("sgd", "adamw"),
        description="sgd: SGD with Nesterov momentum; adamw: AdamW.",
    ),
    _p("momentum", float, 0.9, "Momentum", minimum=0, maximum=1, form=False),
    _p(
        "weight_decay",
        float,
        1e-4,
        "Weight decay",
        minimum=0,
        maximum=1,
        form=False,
        description="On weights only; BatchNorm parameters and biases never decay.",
    ),
    _p(
        "warmup_epochs",
        float,
        1.0,
        "Warmup epochs",
        minimum=0,
        maximum=1000,
        form=False,
        description="Linear warmup before the cosine decay (the backbone gets its own after "
        "head-only epochs).",
    ),
    _p("label_smoothing", float, 0.1, "Label smoothing", minimum=0, maximum=0.99, form=False),
    _p(
        "imbalance",
        str,
        "class_weights",
        "Imbalance remedy",
        choices=("class_weights", "sampler", "none"),
        description="How rare labels are made to count: class_weights weighs the loss by "
        "inverse label frequency, sampler draws images so that labels come equally often, "
        "none trains on the data as it is.",
    ),
    _p(
        "agreement_weighting",
        bool,
        False,
        "Weigh by annotator agreement",
        description="Weigh each training image's loss by its annotators' agreement (the CSV's "
        "confidence), so ambiguous images count less; images without one weigh 1.",
    ),
    _p(
        "head_epochs",
        int,
        0,
        "Head-only epochs",
        minimum=0,
        maximum=1000,
        description="First epochs train the new head only (backbone frozen).",
    ),
    _p(
        "image_size",
        int,
        224,
        "Image size",
        minimum=32,
        maximum=1024,
        description="Training crop in pixels.",
    ),
    _p(
        "device",
        str,
        "auto",
        "Device",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        expects="auto, cpu, cuda or cuda:N (for example cuda:0)",
        description="auto, cpu, cuda or cuda:N; on a GPU worker auto means cuda.",
    ),
    _p(
        "precision",
        str,
        "bf16",
        "Precision",
        choices=("bf16", "fp16", "fp32"),
        description="Mixed precision on CUDA: bf16 (fp16 with a grad scaler where the GPU has "
        "no native bf16), fp16 (grad scaler) or fp32.",
    ),
    _p(
        "channels_last",
        bool,
        True,
        "channels_last",
        form=False,
        description="channels_last memory format.",
    ),
    _p("compile", bool, False, "torch.compile", form=False, description="torch.compile the model."),
    _p(
        "clip_grad",
        float,
        1.0,
        "Gradient clip",
        minimum=0,
        form=False,
        description="Gradient norm clip, 0 to disable.",
    ),
    _p(
        "patience",
        int,
        3,
        "Early-stopping patience",
        minimum=0,
        maximum=1000,
        description="Epochs without a better validation macro-F1; 0 disables.",
    ),
    _p(
        "workers",
        int,
        -1,
        "Data loader workers",
        minimum=-1,
        maximum=16,
        description="Data loader workers per training process; -1: the worker's CPUs less one "
        "per process, shared, at most 8 each.",
    ),
    _p(
        "max_steps_per_epoch",
        int,
        0,
        "Steps per epoch cap",
        minimum=0,
        description="0 for all (a cap is for smoke tests).",
    ),
    _p(
        "checkpoint_every",
        int,
        1,
        "Checkpoint every",
        minimum=1,
        maximum=1000,
        form=False,
        description="Write the resumable checkpoint every N epochs (and after the last).",
    ),
    _p(
        "ddp_timeout_minutes",
        float,
        60.0,
        "DDP timeout",
        minimum=0,
        exclusive_minimum=True,
        form=False,
        description="Collective timeout under torchrun (rank 0 alone evaluates, "
        "uploads and exports meanwhile).",
    ),
    _p("experiment", str, "image-sentiment", "MLflow experiment", form=False),
    _p("run_name", str, "", "MLflow run name", form=False),
    _p(
        "checkpoint",
        str,
        "",
        "Checkpoint folder",
        form=False,
        description="s3:// folder for checkpoints (default: derived from the split and settings).",
    ),
    _p(
        "cache_dir",
        str,
        "",
        "Image cache",
        form=False,
        description="Local image cache (default: ~/.cache/image-sentiment/images).",
    ),
    _p(
        "orchestrator_run_id",
        str,
        "",
        "Orchestrator run id",
        form=False,
        description="The orchestrator's run id, tagged on the run and the model version.",
    ),
    _p(
        "inference_batch_size",
        int,
        32,
        "Images per forward pass",
        minimum=1,
        maximum=4096,
        form=False,
        description="Images per forward pass when a registered model scores images.",
    ),
    # --- register -----------------------------------------------------------------------
    _p(
        "model_name",
        str,
        "image-sentiment",
        "Registered model",
        pattern=NAME_PATTERN,
        expects=NAME_RULE,
        env="ML_MODEL_NAME",
        description="The MLflow registered model.",
    ),
    _p(
        "promotion_margin",
        float,
        0.0,
        "Promotion margin",
        minimum=0,
        maximum=1,
        description="Macro-F1 a new version must gain over the champion, both scored on the "
        "new version's test images, to become champion.",
    ),
    _p(
        "promotion_resamples",
        int,
        1000,
        "Bootstrap resamples",
        minimum=100,
        maximum=100_000,
        description="Paired bootstrap resamples of the test images for the gain's interval.",
    ),
    _p(
        "promotion_confidence",
        float,
        0.95,
        "Bootstrap confidence",
        minimum=0.5,
        maximum=0.999,
        description="Confidence of the gain's interval; its lower end must be above 0 to promote.",
    ),
    _p(
        "promotion_band",
        str,
        "all",
        "Promotion band",
        choices=("all", "all_agree", "majority", "no_majority"),
        description="Which test images decide promotion: all of them, or only those of one "
        "annotator-agreement band (all_agree: every annotator chose the label; majority; "
        "no_majority).",
    ),
    _p(
        "force_retrain",
        bool,
        False,
        "Force retraining",
        description="Train and register even when the dataset content and training settings "
        "equal the current champion's (otherwise such a run trains nothing).",
    ),
)
PARAMETERS: dict[str, Parameter] = {p.name: p for p in _DECLARED}
#: The parameters of the trigger form, in form order.
FORM: tuple[Parameter, ...] = tuple(p for p in _DECLARED if p.form)
#: The download stage's options (``python -m ml download``, ``predict``).
DOWNLOAD: tuple[str, ...] = (
    "download_concurrency",
    "per_host",
    "connect_timeout",
    "read_timeout",
    "deadline",
    "retries",
    "max_bytes",
    "max_pixels",
    "max_side",
    "flush_rows",
)


def form_table() -> str:
    """The trigger form's parameters as the README's Markdown table (a test keeps them equal:
    regenerate with ``python -c "from ml.params import form_table; print(form_table())"``)."""

    def shown(parameter: Parameter) -> str:
        if parameter.name == "csv":
            return "`$ML_CSV` or `$ML_STORE/input/images.csv`"
        value = parameter.default
        text = (
            str(value).lower()
            if isinstance(value, bool)
            else f"{value:g}"
            if isinstance(value, float)
            else str(value)
        )
        text = f"`{text}`"
        return f"{text} (`{parameter.env}`)" if parameter.env else text

    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    rows += [f"| `{p.name}` | {shown(p)} | {p.description} |" for p in FORM]
    return "\n".join(rows)


def text_rules() -> list[TextRule]:
    """The rules of the parameters' text fields (see :class:`TextRule`)."""
    return [TextRule(p.pattern, p.expects) for p in PARAMETERS.values() if p.pattern]


def check_all(values: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The named parameters' values from ``values`` (defaults where absent), checked."""
    return {name: PARAMETERS[name].check(values.get(name)) for name in names}


def unknown(values: Mapping[str, Any], allowed: Iterable[str]) -> list[str]:
    return sorted(set(values) - set(allowed))


def add_options(
    parser: argparse.ArgumentParser | Any,
    names: Sequence[str],
    *,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """``--name`` options (bools as ``--name/--no-name``) for the named parameters."""
    for name in names:
        parameter = PARAMETERS[name]
        default = (defaults or {}).get(name, parameter.default)
        text = parameter.description or parameter.title
        if parameter.kind is bool:
            parser.add_argument(
                parameter.flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=text,
            )
            continue
        parser.add_argument(
            parameter.flag,
            dest=name,
            type=parameter.argparse_type(),
            required=parameter.required,
            default=default,
            metavar=parameter.metavar or name.upper(),
            help=_help(parameter, text, default),
        )


def _help(parameter: Parameter, text: str, default: Any) -> str:
    """The option's help: its choices, and its default unless the text already says it."""
    extra = []
    if parameter.choices:
        extra.append("one of " + ", ".join(parameter.choices))
    if parameter.required:
        extra.append("required")
    elif "default" not in text.lower() and default not in ("", None):
        extra.append("default: %(default)s")
    return f"{text} ({'; '.join(extra)})" if extra else text


def fields_of(cls: Any) -> list[str]:
    """The parameter names a configuration dataclass declares (via :meth:`Parameter.field`)."""
    return [f.name for f in dataclasses.fields(cls) if "parameter" in f.metadata]
