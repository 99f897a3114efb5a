"""bonsai-mlx: FLUX.2 [klein] with binary and ternary weights, in MLX."""

from .bundle import load_bundle, verify as verify_bundle
from .config import KLEIN_4B, KLEIN_9B, TransformerConfig
from .convert import convert_pipeline
from .errors import (BonsaiError, ConfigError, NonFiniteError, PipelineBusyError, UnsafeFileError,
                     WeightsError)
from .export import export_bundle
from .loading import load_transformer
from .memory import MemoryMonitor, MemoryPlan
from .packed_checkpoint import save_packed
from .pipeline import BonsaiPipeline, Cancelled, GenerationResult, StepEvent
from .text_encoder import load_text_encoder
from .transformer import Flux2Transformer
from .vae import load_vae

__version__ = "0.1.0"
