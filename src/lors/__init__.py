"""lors: merge fine-tuned Whisper experts with LoRS-Merging and its baselines."""

__version__ = "0.1.0"
