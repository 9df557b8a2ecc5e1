"""The anchor-learning study (``python study.py``): train arms, evaluate checkpoints, write the report."""

from .runner import Study, compose, main

__all__ = ["Study", "compose", "main"]
