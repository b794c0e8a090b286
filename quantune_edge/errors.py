"""Errors the user can act on.

Every failure the CLI reports is a :class:`QuantuneError`: its message is one line that names the
offending file, op or value, so the CLI can print it without a traceback and exit non-zero.
"""
from __future__ import annotations


class QuantuneError(Exception):
    """A failure caused by the user's input or environment, with a one-line explanation."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class InputError(QuantuneError):
    """Bad model, data or option given by the user."""


class ConversionError(QuantuneError):
    """The model could not be converted (e.g. an op the converter does not support)."""


class VerificationError(QuantuneError):
    """The converted model does not compute what the source model computes."""


class DeviceError(QuantuneError):
    """A target device could not be reached, trusted, or used (SSH, host key, runtime, disk)."""

    exit_code = 3
