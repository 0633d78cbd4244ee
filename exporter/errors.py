"""Errors a user can cause. The CLI prints them as one line and exits non-zero; anything else is a bug."""


class BigCodeError(Exception):
    """Base class: the message names what is wrong and what to do."""


class ConfigError(BigCodeError):
    """A config.json that this model cannot be built from."""


class CheckpointError(BigCodeError):
    """A checkpoint directory whose files do not match the config or cannot be read."""
