"""The project's error types.

Every user-facing problem raises a subclass of `SeedClusterError` with a one-line
message that says what is wrong, where (config key or file) and what to do.
Launchers print such errors without a traceback and exit non-zero; anything
else is a bug and keeps its traceback.
"""


class SeedClusterError(Exception):
    """Base class of errors caused by the user's input or environment."""


class ConfigError(SeedClusterError, ValueError):
    """An invalid configuration value or combination of values."""


class DataError(SeedClusterError):
    """A dataset (.beton, image folder, TSV) is missing, corrupt or mismatched."""


class CheckpointError(SeedClusterError):
    """A checkpoint is unreadable, incompatible, or cannot be written."""


class TeacherError(SeedClusterError):
    """A teacher checkpoint does not fit the configured teacher."""


class NonFiniteLossError(SeedClusterError):
    """The loss became NaN or infinite on some rank."""
