"""Merging fine-tuned Whisper experts: primitives, methods, groups, config and the engine."""

from .config import MergeConfig, load_config, resolve, validate_config
from .engine import merge, plan_merge

__all__ = ["MergeConfig", "load_config", "merge", "plan_merge", "resolve", "validate_config"]
