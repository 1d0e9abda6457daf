"""Errors that mean "the input is wrong", as opposed to a bug.

The CLI prints these as one clear line (no traceback) and exits non-zero; every stage module
derives its own error types from :class:`RapmError`.
"""


class RapmError(Exception):
    """Base class of errors caused by the user's input, files or environment."""

    exit_code = 1


class SamplingError(RapmError):
    """A row cannot be sampled as configured (its LoRA, router or images missing or unreadable)."""
