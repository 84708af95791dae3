"""The live backend: a real DLRM-style input pipeline with resizable stage pools.

- :mod:`intune_env.live.data`: Criteo-shaped Parquet shards, generated once per spec.
- :mod:`intune_env.live.pipeline`: the pipeline (:class:`LivePipeline`).
- :mod:`intune_env.live.calibrate`: live sweeps, fitting a simulator scenario, prediction
  error at held-out allocations.
- :mod:`intune_env.live.cli`: the ``intune calibrate`` and ``intune live-sweep`` commands.

The Gymnasium env is :class:`intune_env.live_env.InTuneLiveEnv` (``InTuneLive-v0``).
Names below are imported lazily, so ``intune --help`` does not pay for pyarrow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Dataset": "intune_env.live.data",
    "DatasetSpec": "intune_env.live.data",
    "ensure_dataset": "intune_env.live.data",
    "STAGES": "intune_env.live.pipeline",
    "LivePipeline": "intune_env.live.pipeline",
    "PipelineConfig": "intune_env.live.pipeline",
    "PipelineError": "intune_env.live.pipeline",
    "tree_rss": "intune_env.live.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'intune_env.live' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
