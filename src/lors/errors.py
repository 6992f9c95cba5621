"""Errors lors raises for bad input: each message names the file or tensor and what to do."""


class LorsError(Exception):
    """Base class: a user-facing error. The CLI prints its message without a traceback."""


class CheckpointError(LorsError):
    """A checkpoint cannot be read, is unsafe, or is not what it claims to be."""


class CompatibilityError(LorsError):
    """An expert does not fit the base (config, tensor names, shapes, or a different base)."""


class ConfigError(LorsError):
    """A merge or experiment configuration is invalid."""


class OutputExistsError(LorsError):
    """The output path exists and overwriting was not asked for."""


class MergeError(LorsError):
    """A merge produced something that must not be written (NaN or Inf weights)."""


class LorsWarning(UserWarning):
    """Something legal but probably unintended; the CLI prints it as ``lors: warning: ...``."""
