"""The one exception type a user sees: a message that says what went wrong and what to do."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix (bad input, unreachable store, wrong parameter).

    Usage: ``raise PipelineError("bucket 'x' does not exist; create it first")``.
    The CLI prints the message on one line and exits non-zero; it never shows a traceback.
    """


class ParameterError(PipelineError):
    """A run parameter or a deployment setting is wrong: retrying cannot help, so the run fails
    at once."""


#: How every out-of-memory error of training begins (the torchrun supervisor looks for it).
OUT_OF_MEMORY = "out of GPU memory"
