"""The project's errors: each one a user can cause. The CLI prints them as one line and exits 2; the C ABI maps
them to status codes. Anything else is a bug (a traceback)."""


class BigCodeError(Exception):
    """Base class: the message names what is wrong and what to do."""


class ConfigError(BigCodeError):
    """A config.json that this model cannot be built from."""


class CheckpointError(BigCodeError):
    """A checkpoint directory whose files do not match the config or cannot be read."""


class BundleError(BigCodeError):
    """A bundle that cannot be used: missing files, another format version, a graph that changed."""


class ParityError(BigCodeError):
    """A graph whose outputs disagree with the reference beyond what its criteria allow."""


class BackendUnavailable(BigCodeError):
    """A backend whose library or device is missing here."""


class ContextOverflow(BigCodeError):
    """A prompt plus the tokens to generate would exceed the model's context."""


class LintError(BigCodeError):
    """A graph that TensorRT's parser would reject."""


class StateError(BigCodeError):
    """A call out of order: a step before a prefill, a closed or stale handle, a session whose bundle was closed."""
