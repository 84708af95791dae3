"""Tuners for `InTune-v0`: InTune Q-learning, AUTOTUNE-like, Plumber-like, static, SB3."""
