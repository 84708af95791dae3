"""The live backend: a real DLRM-style input pipeline with resizable stage pools.

- :mod:`intune_env.live.data`: Criteo-shaped Parquet shards, generated once per spec.
- :mod:`intune_env.live.config`: the stage order, every live default, :class:`PipelineConfig`.
- :mod:`intune_env.live.stages`: the items between stages and the registry of stages
  (a function per item and per-worker hooks, by name).
- :mod:`intune_env.live.processes`: worker processes of the stateless stages.
- :mod:`intune_env.live.workers`: buffers, workers and resizable pools.
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
    "STAGES": "intune_env.live.config",
    "LivePipeline": "intune_env.live.pipeline",
    "PipelineConfig": "intune_env.live.config",
    "PipelineError": "intune_env.live.config",
    "register_stage": "intune_env.live.stages",
    "tree_rss": "intune_env.live.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'intune_env.live' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
