"""Errors with a clear message naming the problem and what to do about it.

Every error the engine raises for bad input is a ``HeadScopeError``; scripts and the app
print ``str(err)`` instead of a traceback.
"""


class HeadScopeError(Exception):
    """Base class: the message says what went wrong and how to fix it."""


class ModelLoadError(HeadScopeError):
    """Unknown model name, unsupported architecture, or weights that cannot be read."""


class WeightsMismatchError(ModelLoadError):
    """Weights whose keys or shapes do not fit the model."""


class ImageReadError(HeadScopeError):
    """An image file that is missing, corrupt or unreadable."""


class DatasetMissingError(HeadScopeError):
    """A named data set that is not installed on this machine."""


class LabelError(HeadScopeError):
    """Labels outside the model's classes."""


class InputError(HeadScopeError):
    """Tensors or arguments of the wrong shape, size or range."""


class CacheError(HeadScopeError):
    """A run directory that is missing, incomplete, stale or built with another schema."""


class ConfigError(HeadScopeError):
    """A setting (environment variable, option, users file) that cannot be used."""


class OnlineError(HeadScopeError):
    """An online query (partial pruning, attention of one image) that failed: worker down, unknown
    run, image or head; str(err) says why and what to do."""
