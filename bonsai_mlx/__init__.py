"""bonsai-mlx: FLUX.2 [klein] with binary and ternary weights, in MLX."""

from .config import KLEIN_4B, KLEIN_9B, TransformerConfig
from .errors import BonsaiError, ConfigError, WeightsError
from .loading import load_transformer
from .transformer import Flux2Transformer
from .pipeline import BonsaiPipeline, GenerationResult, StepEvent

__version__ = "0.1.0"
