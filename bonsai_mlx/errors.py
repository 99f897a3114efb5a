"""The exceptions and warnings bonsai_mlx raises at its users.

Each message says what is wrong and what to do about it, so callers (the CLI, the
Swift app) can show it as is instead of a traceback from deep inside. Errors about a
file name that file.
"""


class BonsaiError(ValueError):
    """Bad input to bonsai_mlx: a path, a file, a shape, a config or an option."""


class WeightsError(BonsaiError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class ConfigError(BonsaiError):
    """A model config that bonsai_mlx cannot represent."""


class UnsafeFileError(WeightsError):
    """A model file bonsai_mlx refuses to open: a path (from an index, a layout folder or a
    symlink) that leads out of the model folder, something that is not a regular file
    (a FIFO, a device, a folder), a file over its size cap, or pickled weights."""


class NonFiniteError(BonsaiError):
    """NaN or Inf appeared during a generation. `stage` is "text encoding", "denoising"
    or "decoding"; `step` the 1-based denoising step (None outside denoising)."""

    def __init__(self, message: str, stage: str, step: int | None = None):
        super().__init__(message)
        self.stage, self.step = stage, step


class PipelineBusyError(BonsaiError):
    """A pipeline was asked for a generation while it was running another one."""


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the text encoder reads was cut; the message says by how much."""


class BackendFallbackWarning(UserWarning):
    """A packed format without GPU kernels runs on the reference matmul instead."""
