"""Fine-tuning Whisper experts, the MTL model and sequential training (see :func:`train`)."""

from .api import prepare, train
from .config import TrainConfig, parse_pairs

__all__ = ["TrainConfig", "parse_pairs", "prepare", "train"]
