"""The one error family of kvforge.

Every failure a user can cause (bad documents, bad artifacts, a missing or
mismatched model, a document that does not fit) is a :class:`KvforgeError`.
Messages name the path, the field, what was expected and what was found, and
say what to do. Foreign exceptions (safetensors, json, OSError ...) are
converted at the boundary where they occur.
"""

from __future__ import annotations


class KvforgeError(Exception):
    """Base class of every error kvforge raises on purpose."""


class InputError(KvforgeError):
    """A source document is unusable: empty, binary, not UTF-8, not found."""


class FormatError(KvforgeError):
    """A file is not a valid kvforge artifact (or library manifest)."""


class UnsupportedVersionError(FormatError):
    """The artifact's format major version is not one this reader knows."""


class IntegrityError(FormatError):
    """The artifact is well-formed but its checksum or contents do not hold."""


class IncompatibleModelError(KvforgeError):
    """The artifact was built for another model or tokenizer."""


class ModelNotFoundError(KvforgeError):
    """The requested model is not installed or not a model directory."""


class UnsupportedModelError(KvforgeError):
    """The model's architecture has layers kvforge cannot cache or compress (refused when it is loaded)."""


class ResourceLimitError(KvforgeError):
    """An input exceeds a limit: the model's context, a size cap."""


class ConfigError(KvforgeError):
    """An option has an invalid value (unknown method, keep out of range ...)."""


class WorkerLostError(KvforgeError):
    """A build worker died (killed, out of memory, its node lost) more often than the executor retries."""


class DeviceError(ConfigError):
    """The asked device is not on this machine, or cannot compute in the asked dtype."""


class TrainingError(KvforgeError):
    """A training run cannot go on (its loss became NaN or inf, its checkpoint disagrees with the asked run)."""
