"""Keep secrets in URLs out of everything a person or another system reads.

A URL can carry credentials: a user name and password (``https://user:pass@host``) or a signed
query (``?token=...``, ``X-Amz-Signature=...``, ``sig=...``). Wherever a URL is written for
people or other systems (logs, JSON summaries, ``dataset.json``, manifests, MLflow params and
tags, error messages) it goes through :func:`redact_url`, or free text through
:func:`redact_text`; :class:`RedactingFilter` does the same to every log record of ``ml``.
The URL itself is still used, unredacted, for the request that needs it.

Usage: ``redact_url("https://u:p@h/x?token=1&w=2") == "https://***@h/x?token=***&w=2"``.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

MASK = "***"
#: Query names whose values are secrets (compared case-insensitively, ``-`` read as ``_``).
SECRET_NAMES = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "auth",
        "authorization",
        "key",
        "apikey",
        "api_key",
        "access_key",
        "secret",
        "client_secret",
        "password",
        "passwd",
        "pwd",
        "pass",
        "signature",
        "sig",
        "credential",
        "credentials",
        "session",
        "sessionid",
        "session_token",
        "security_token",
        "awsaccesskeyid",
        "policy",
        "key_pair_id",
        "code",
    }
)
#: Name fragments that mark a secret wherever they appear in a query name.
_SECRET_PARTS = ("token", "secret", "password", "passwd", "signature", "credential", "apikey")
_URL = re.compile(r"""\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s"'<>`]+""")
#: ``user:password@`` in text that is not a whole URL (for example a DSN in a message).
_USERINFO = re.compile(r"(?<=://)[^\s/@:\"']*:[^\s/@\"']*@")


def _secret_name(name: str) -> bool:
    key = name.strip().lower().replace("-", "_")
    return (
        key in SECRET_NAMES
        or key.startswith("x_amz_")
        or key.startswith("x_goog_")
        or any(part in key for part in _SECRET_PARTS)
    )


def redact_url(url: str) -> str:
    """``url`` with its user info and secret query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub(f"{MASK}@", url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret_name(name) for name, _ in pairs):
            query = "&".join(
                f"{quote(name, safe='')}={MASK if _secret_name(name) else quote(value, safe='')}"
                for name, value in pairs
            )
    fragment = parts.fragment
    if fragment and ("=" in fragment and any(_secret_name(n) for n, _ in parse_qsl(fragment))):
        fragment = MASK
    if netloc == parts.netloc and query == parts.query and fragment == parts.fragment:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (and any ``scheme://user:pass@`` left over)."""
    if "://" not in text:
        return text
    return _USERINFO.sub(f"{MASK}@", _URL.sub(lambda m: redact_url(m.group(0)), text))


def first_line(exc: BaseException, limit: int = 200) -> str:
    """What a one-line error report quotes of ``exc``: its message's first line, redacted and
    cut to ``limit`` characters, or its type's name when that line is empty."""
    return _message_line(exc, limit) or type(exc).__name__


def named_line(exc: BaseException, limit: int = 200) -> str:
    """``first_line`` after the error's type ("ValueError: bad header"), for reports where the
    type says what failed; the type alone when that line is empty (never "OSError: OSError")."""
    line = _message_line(exc, limit)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _message_line(exc: BaseException, limit: int) -> str:
    """The first line, redacted, then cut: cut first, a URL's password could lose the "@" that
    marks it and show its first characters."""
    lines = str(exc).splitlines()
    return redact_text(lines[0])[:limit] if lines and lines[0] else ""


class RedactingFilter(logging.Filter):
    """Redacts URLs in a record's message, its arguments and its traceback text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's to report
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


_FILTER = RedactingFilter()


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with URL redaction on every record it emits."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
