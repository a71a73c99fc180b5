"""What a run parameter may point at: the rules that keep a form user inside the pipeline.

Whoever fills in an Airflow trigger form is not trusted with the worker: a parameter must not
read arbitrary files, write where Python later executes code, load code-bearing models, or
reach internal addresses. These checks run before any work starts, and every message names the
parameter and the rule.

- **Inputs** (``csv``, ``weights`` files): http(s) URLs (fetched under the address policy), or
  ``s3://`` URIs and local paths inside the *input roots*: ``ML_INPUT_ROOTS`` (space-separated
  ``s3://`` prefixes and local folders), by default the store itself. The deployment's own
  defaults (``ML_CSV``, ``ML_WEIGHTS``) are trusted as they are.
- **Outputs** (``output``): ``.csv`` or ``.parquet``, inside the store, or inside the local folder
  ``ML_OUTPUT_DIR`` when one is configured; no ``..``, no links out of the folder.
- **Models** (``model_uri``): only ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.

Usage: ``check_output("s3://bucket/prefix/out.csv", store="s3://bucket/prefix")``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from ml.errors import ParameterError
from ml.params import TextRule
from ml.redact import redact_url
from ml.uri import S3Uri

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"
ALIAS_PATTERN = r"[A-Za-z][A-Za-z0-9_\-]{0,63}"
#: The model URIs a form may name (also the trigger form's JSON-schema pattern).
MODEL_URI_PATTERN = rf"^models:/{NAME_PATTERN}(@{ALIAS_PATTERN}|/[1-9][0-9]{{0,9}})$"
#: The batch-inference form's rules (the workers check them again, with these functions).
MODEL_URI_RULE = TextRule(
    MODEL_URI_PATTERN,
    "a registered model, models:/NAME@ALIAS or models:/NAME/VERSION, for example "
    "models:/image-sentiment@champion",
)
OUTPUT_RULE = TextRule(
    r"^$|^[^\x00-\x1f]*\.(csv|parquet)$",
    "empty, or a path or s3:// URI ending in .csv or .parquet, for example "
    "s3://bucket/predictions/today.parquet",
)
#: The forget form's rules: the image is only ever matched against manifests, never fetched.
FORGET_IMAGE_RULE = TextRule(
    r"^([0-9a-fA-F]{64}|[hH][tT][tT][pP][sS]?://[^\x00-\x1f\x7f]{1,4000})\Z",
    "an image's http(s) URL or the SHA-256 of its stored bytes (64 hex digits), for example "
    "https://example.com/photo.jpg",
)
FORGET_REASON_RULE = TextRule(
    r"^(?=[^\x00-\x1f\x7f]{1,2000}\Z)[^\x00-\x1f\x7f]*[^\x00-\x20\x7f]",
    "a reason in words, kept in the audit trail (at most 2000 characters), for example owner "
    "asked for removal",
)
OUTPUT_SUFFIXES = (".csv", ".parquet")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


class ContainmentError(ParameterError):
    """A run parameter points outside what the pipeline allows (never retried)."""


def check_name(value: str, parameter: str = "model_name") -> str:
    """A registered-model name: letters, digits, ``_``, ``.``, ``-`` (at most 128)."""
    if not re.fullmatch(NAME_PATTERN, value or ""):
        raise ContainmentError(
            f"parameter '{parameter}' must be 1-128 letters, digits, '_', '.' or '-' "
            f"(starting with a letter or digit), got {value!r}"
        )
    return value


def check_model_uri(value: str, parameter: str = "model_uri") -> str:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>``, nothing else."""
    if not isinstance(value, str) or not re.fullmatch(MODEL_URI_PATTERN, value):
        raise ContainmentError(
            f"parameter '{parameter}' must be a registered model, models:/<name>@<alias> or "
            f"models:/<name>/<version>, got {redact_url(str(value))!r}"
        )
    return value


def _clean_key(key: str, parameter: str, shown: str) -> PurePosixPath:
    """An object key with no traversal, empty or dot segments, backslashes or control bytes."""
    parts = key.split("/")
    if _CONTROL.search(key) or any(p in ("", ".", "..") for p in parts):
        raise ContainmentError(
            f"parameter '{parameter}' {shown!r} has an empty, '.' or '..' path segment or a "
            "control character"
        )
    return PurePosixPath(key)


def inside_s3(uri: S3Uri, root: S3Uri) -> bool:
    """``uri`` is ``root`` or lies under it."""
    return uri.bucket == root.bucket and (
        not root.key or uri.key == root.key or uri.key.startswith(root.key + "/")
    )


def _inside_dir(path: Path, root: Path) -> bool:
    """``path`` (resolved, links followed) lies inside ``root`` (resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


def check_output(value: str, *, store: str, output_dir: str = "", parameter: str = "output") -> str:
    """An output path a form may write: ``.csv``/``.parquet``, inside the store or
    ``output_dir``; returns it unchanged."""
    shown = redact_url(value)
    if not value or not value.lower().endswith(OUTPUT_SUFFIXES):
        raise ContainmentError(
            f"parameter '{parameter}' must end in .csv or .parquet, got {shown!r}"
        )
    if value.startswith("s3://"):
        uri = S3Uri.parse(value)
        _clean_key(value[len("s3://") :], parameter, shown)
        if store and inside_s3(uri, S3Uri.parse(store)):
            return value
        raise ContainmentError(
            f"parameter '{parameter}' must be inside the store {store or '(ML_STORE unset)'}, "
            f"got {shown!r}"
        )
    if "://" in value:
        raise ContainmentError(
            f"parameter '{parameter}' must be an s3:// URI in the store or a local path, "
            f"got {shown!r}"
        )
    if not output_dir:
        raise ContainmentError(
            f"parameter '{parameter}' may only name a location in the store ({store}); local "
            "files need ML_OUTPUT_DIR set in the deployment"
        )
    _clean_key(value.lstrip("/") if Path(value).is_absolute() else value, parameter, shown)
    root = Path(output_dir)
    path = Path(value) if Path(value).is_absolute() else root / value
    if not _inside_dir(path, root):
        raise ContainmentError(
            f"parameter '{parameter}' must be inside {output_dir} (ML_OUTPUT_DIR), got {shown!r}"
        )
    return str(path)


def input_roots(env: Mapping[str, str], store: str) -> tuple[str, ...]:
    """``ML_INPUT_ROOTS`` (space- or comma-separated), else the store alone."""
    roots = tuple(env.get("ML_INPUT_ROOTS", "").replace(",", " ").split())
    return roots or ((store,) if store else ())


def check_input(
    value: str,
    *,
    roots: Sequence[str],
    parameter: str,
    trusted: Sequence[str] = (),
    urls: bool = True,
) -> str:
    """A file a form may read: an http(s) URL (when ``urls``), or an s3:// URI or local path
    inside one of ``roots``; a value in ``trusted`` (the deployment's own default) passes."""
    if value in trusted:
        return value
    shown = redact_url(value)
    lowered = value.lower()
    if lowered.startswith(("http://", "https://")):
        if urls:
            return value
        raise ContainmentError(f"parameter '{parameter}' cannot be a URL, got {shown!r}")
    if value.startswith("s3://"):
        uri = S3Uri.parse(value)
        _clean_key(value[len("s3://") :], parameter, shown)
        if any(r.startswith("s3://") and inside_s3(uri, S3Uri.parse(r)) for r in roots):
            return value
    elif "://" in value:
        raise ContainmentError(
            f"parameter '{parameter}' must be an http(s) URL, an s3:// URI or a path, got {shown!r}"
        )
    elif value and not _CONTROL.search(value):
        path = Path(value)
        local = [Path(r) for r in roots if "://" not in r]
        if path.is_absolute() and any(_inside_dir(path, root) for root in local):
            return value
    allowed = ", ".join(roots) or "(none configured)"
    raise ContainmentError(
        f"parameter '{parameter}' may only read from {allowed} (ML_INPUT_ROOTS)"
        f"{' or an http(s) URL' if urls else ''}, got {shown!r}"
    )


def output_dir_setting(env: Mapping[str, str] | None = None) -> str:
    """``ML_OUTPUT_DIR``: the one local folder a form may write predictions to (or empty)."""
    env = os.environ if env is None else env
    return env.get("ML_OUTPUT_DIR", "").strip()
