"""Training pipeline behind ``python train.py +exp=...`` (Hydra config in conf/, HF Trainer, DeepSpeed).

``run(cfg)`` trains from a composed config; ``validate(cfg)`` checks one without training.
"""

from ..schema.confdir import available_options
from .config import ConfigError, validate
from .runner import TrainResult, run

__all__ = ["ConfigError", "TrainResult", "available_options", "run", "validate"]
