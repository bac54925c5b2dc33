"""Errors a user can act on: each message names the bad value, what was expected, and the way out."""


class WorkbenchError(Exception):
    """Base class: the CLI and the app show these as plain messages, without a traceback."""


class ConfigError(WorkbenchError, ValueError):
    """A configuration that cannot work (for example d_model not divisible by n_heads)."""


class HookError(WorkbenchError, ValueError):
    """An unknown hook name, or a hook function that returned something of the wrong shape."""


class InputError(WorkbenchError, ValueError):
    """Bad model input: tokens out of range, a prompt longer than the context, an empty prompt."""


class CheckpointError(WorkbenchError, ValueError):
    """A checkpoint or model file that is missing, truncated, corrupt, or does not match its config."""


class DataError(WorkbenchError, ValueError):
    """A corpus, activation store or dataset that is empty, corrupt or does not fit the request."""
