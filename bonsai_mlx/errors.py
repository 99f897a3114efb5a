"""One exception type for every user-facing failure.

Each message says what is wrong and what to do about it, so callers (the CLI, the
Swift app) can show it as is instead of a traceback from deep inside.
"""


class BonsaiError(ValueError):
    """Bad input to bonsai_mlx: a path, a file, a shape, a config or an option."""


class WeightsError(BonsaiError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class ConfigError(BonsaiError):
    """A model config that bonsai_mlx cannot represent."""
