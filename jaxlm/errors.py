"""User-facing errors.

Anything a user can cause with bad input (a missing file, a wrong shape, an
unknown option) raises a subclass of :class:`JaxlmError`. Command-line entry
points catch exactly this class and print its one-line message, so bugs in
jaxlm itself still surface with a full traceback.
"""


class JaxlmError(ValueError):
    """A problem with the user's input: files, configs, shapes or options."""


class ConfigError(JaxlmError):
    """An invalid model or experiment configuration."""


class CheckpointError(JaxlmError):
    """A missing, corrupt or mismatched checkpoint file or tensor."""
