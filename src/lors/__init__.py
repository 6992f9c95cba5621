"""lors: merge fine-tuned Whisper experts with LoRS-Merging and its baselines.

``from lors import merge, train, evaluate, run_experiment``: the four jobs of the command
line as Python functions (see :mod:`lors.api`). They are imported on first use, so
``import lors`` stays light.
"""

__version__ = "0.2.0"
__all__ = ["evaluate", "merge", "run_experiment", "train"]


def __getattr__(name: str):
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'lors' has no attribute {name!r}")
