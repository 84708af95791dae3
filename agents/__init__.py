"""Tuners for `InTune-v0`: InTune Q-learning, AUTOTUNE-like, Plumber-like, static, SB3."""

from simulators import __version__

__all__ = ["__version__"]
