"""The anchor-learning study (``python study.py``): train arms, evaluate checkpoints, write the report."""

from .runner import Study, main

__all__ = ["Study", "main"]
