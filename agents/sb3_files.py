"""Saved SB3 models as data: loading a model folder never runs code from it.

A model saved by :class:`agents.sb3_agents.SB3Agent` is three files next to each other:

- ``NAME.zip``: SB3's own archive (``data`` JSON, ``policy.pth`` weights, ...);
- ``NAME.json``: the sidecar, what the model was trained on (:data:`SIDECAR_VERSION`:
  algorithm, scenario, stage names, observation and action shapes, whether it normalises
  observations, training budget and hyperparameters);
- ``NAME.vecnormalize.json``: the observation statistics (mean, var, count, clip,
  epsilon) when the model was trained with ``VecNormalize``.

Why this module exists: SB3's ``load`` base64-decodes and *unpickles* every ``data``
entry marked ``:serialized:`` (spaces, schedules, the policy class, ...), and
``VecNormalize.load`` unpickles its whole file, so a crafted model folder executes code.
Here the ``data`` JSON is read first, every ``:serialized:`` entry is replaced through
SB3's ``custom_objects`` by an object rebuilt from readable fields (spaces from their
shape, schedules as constants, known classes from a short allow-list), so SB3 never
unpickles; the ``.pth`` files are read by SB3 with ``torch.load(weights_only=True)``
(stable-baselines3 >= 2.3), which refuses arbitrary objects. Anything that would still
need unpickling (an unknown serialized entry, a legacy ``.vecnormalize.pkl``) is refused
with one line unless the caller passes ``trust_model=True``.

Every fault in these files is a :class:`ModelFileError` (one line naming the file).
"""

from __future__ import annotations

import collections
import io
import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulators.fileio import (
    InputFileError,
    echo,
    loads_json_strict,
    read_bytes_limited,
    read_text_limited,
)

#: Format of the sidecar JSON written by :func:`write_sidecar`.
SIDECAR_VERSION = 2
#: Cap on a model archive read into memory (the shipped networks are < 1 MB).
MAX_MODEL_BYTES = 256 << 20
#: Largest unpacked 'data' entry (JSON of hyperparameters and spaces: kilobytes in practice).
MAX_DATA_BYTES = 16 << 20
#: Cap on a sidecar or statistics JSON.
MAX_SIDECAR_BYTES = 4 << 20

STATS_SUFFIX = ".vecnormalize.json"
LEGACY_STATS_SUFFIX = ".vecnormalize.pkl"

_TRUST_HINT = "pass --trust-model (trust_model=True) only if you trust whoever made this file"


class ModelFileError(ValueError):
    """A model file (zip, sidecar, statistics) that cannot be used; one-line message."""


def echo_path(path: str | Path, limit: int = 200) -> str:
    """A path safe to print; long ones keep their end (the file name matters most)."""
    text = echo(str(path), limit=10**6)
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def model_paths(model_path: str | Path) -> tuple[Path, Path, Path]:
    """(``.zip``, ``.vecnormalize.json``, ``.json``) of a model given as ``X`` or ``X.zip``.

    Any other suffix is refused: ``--model models/qlearning.json`` for an SB3 agent is the
    wrong kind of file, and silently swapping the suffix would load another file.
    """
    p = Path(model_path)
    if p.suffix not in (".zip", ""):
        raise ModelFileError(f"{echo_path(p)}: an SB3 model is a .zip file (got a "
                             f"{echo(p.suffix)} file); pass the .zip SB3 saved")
    stem = p.with_suffix("") if p.suffix == ".zip" else p
    return (Path(f"{stem}.zip"), Path(f"{stem}{STATS_SUFFIX}"), Path(f"{stem}.json"))


# --- observation statistics ---------------------------------------------------------------
@dataclass(frozen=True)
class ObsStats:
    """Frozen ``VecNormalize`` observation statistics: what evaluation needs, nothing more."""

    mean: np.ndarray
    var: np.ndarray
    count: float
    clip_obs: float
    epsilon: float

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """``VecNormalize.normalize_obs``: ``clip((obs - mean) / sqrt(var + eps), +-clip)``."""
        o = np.asarray(obs, dtype=np.float64)
        out = np.clip((o - self.mean) / np.sqrt(self.var + self.epsilon),
                      -self.clip_obs, self.clip_obs)
        return out.astype(np.float32)

    @classmethod
    def from_vec_normalize(cls, vn: Any) -> ObsStats:
        """Copy the statistics out of a live ``VecNormalize``."""
        rms = vn.obs_rms
        return cls(np.array(rms.mean, dtype=np.float64), np.array(rms.var, dtype=np.float64),
                   float(rms.count), float(vn.clip_obs), float(vn.epsilon))

    def to_dict(self) -> dict[str, Any]:
        return {"format": "intune-obs-stats", "version": 1, "mean": self.mean.tolist(),
                "var": self.var.tolist(), "count": self.count, "clip_obs": self.clip_obs,
                "epsilon": self.epsilon}

    @classmethod
    def from_dict(cls, d: Any, where: str, n_obs: int | None = None) -> ObsStats:
        """Validate the JSON form; :class:`ModelFileError` names the field at fault."""
        if not isinstance(d, dict):
            raise ModelFileError(f"{where}: expected a JSON object of statistics, got "
                                 f"{type(d).__name__}")
        arrays = {}
        for key in ("mean", "var"):
            v = d.get(key)
            if not isinstance(v, list) or not v or not all(
                    isinstance(x, int | float) and not isinstance(x, bool) for x in v):
                raise ModelFileError(f"{where}: field {key!r} must be a non-empty list of "
                                     f"numbers")
            a = np.array(v, dtype=np.float64)
            if not np.all(np.isfinite(a)):
                raise ModelFileError(f"{where}: field {key!r} must hold finite numbers")
            arrays[key] = a
        if arrays["mean"].shape != arrays["var"].shape:
            raise ModelFileError(f"{where}: 'mean' and 'var' have different lengths")
        if np.any(arrays["var"] < 0):
            raise ModelFileError(f"{where}: field 'var' must be >= 0")
        if n_obs is not None and len(arrays["mean"]) != n_obs:
            raise ModelFileError(f"{where}: statistics for {len(arrays['mean'])} observation "
                                 f"values, the model takes {n_obs}")
        scalars = {}
        for key, lo in (("count", 0.0), ("clip_obs", 0.0), ("epsilon", 0.0)):
            v = d.get(key)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) \
                    or v < lo or (key != "count" and v <= 0):
                raise ModelFileError(f"{where}: field {key!r} must be a finite positive number")
            scalars[key] = float(v)
        return cls(arrays["mean"], arrays["var"], **scalars)


def read_json_file(path: Path, what: str) -> Any:
    """A bounded, strict-UTF-8 JSON file; :class:`ModelFileError` with one line."""
    try:
        text = read_text_limited(path, MAX_SIDECAR_BYTES, what)
        return loads_json_strict(text)
    except InputFileError as err:
        raise ModelFileError(str(err)) from None
    except (ValueError, RecursionError) as err:  # syntax, duplicate key, huge integer
        why = err.msg if isinstance(err, json.JSONDecodeError) else echo(str(err), 60)
        raise ModelFileError(f"{echo_path(path)}: {what} is not valid JSON "
                             f"({why or type(err).__name__})") from None


def load_obs_stats(stats_path: Path, legacy_path: Path, trust_model: bool,
                   n_obs: int | None) -> ObsStats:
    """The statistics of a model that normalises observations (JSON, or a trusted pickle)."""
    if stats_path.exists():
        return ObsStats.from_dict(read_json_file(stats_path, "normalisation statistics"),
                                  echo_path(stats_path), n_obs)
    if legacy_path.exists():
        if not trust_model:
            raise ModelFileError(
                f"{echo_path(legacy_path)}: statistics in pickle format can run code when "
                f"loaded; refused ({_TRUST_HINT}), or re-save the model with this version")
        import pickle

        try:
            with open(legacy_path, "rb") as fh:
                vn = pickle.load(fh)  # explicitly trusted by the caller
            return ObsStats.from_vec_normalize(vn)
        except Exception as err:
            raise ModelFileError(f"{echo_path(legacy_path)}: cannot read statistics "
                                 f"({type(err).__name__})") from None
    raise ModelFileError(f"{echo_path(stats_path)}: missing; the model was trained with "
                         f"normalised observations and cannot be used without its statistics")


# --- the zip ------------------------------------------------------------------------------
_CLASS_RE = re.compile(r"<class '([\w.]+)'>")
_FUNC_RE = re.compile(r"<function (\w+)\.__init__ at")
_CONST_RE = re.compile(r"ConstantSchedule\(val=([-+0-9.eE]+)\)")


def _allowed_classes() -> dict[str, Any]:
    """Fully qualified name -> class, for the few classes a policy_kwargs may name."""
    import torch

    return {
        "torch.nn.modules.activation.Tanh": torch.nn.Tanh,
        "torch.nn.modules.activation.ReLU": torch.nn.ReLU,
        "torch.nn.modules.activation.ELU": torch.nn.ELU,
        "torch.nn.modules.activation.LeakyReLU": torch.nn.LeakyReLU,
        "torch.optim.adam.Adam": torch.optim.Adam,
        "torch.optim.rmsprop.RMSprop": torch.optim.RMSprop,
    }


def _plain(value: Any, where: str, key: str) -> Any:
    """A JSON value that must be plain data (lists, numbers, strings, dicts of those)."""
    if isinstance(value, dict):
        return {k: _plain(v, where, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, where, key) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ModelFileError(f"{where}: entry {key!r} is not plain data")


def _rebuild(key: str, item: dict[str, Any], algo_cls: Any, env_spaces: tuple[Any, Any] | None,
             data: dict[str, Any], where: str) -> Any:
    """A safe replacement for one ``:serialized:`` entry, or raise ``KeyError`` if unknown."""
    import gymnasium as gym
    from stable_baselines3.common.utils import ConstantSchedule, FloatSchedule, LinearSchedule

    if key == "policy_class":
        init = _FUNC_RE.search(str(item.get("__init__", "")))
        name = init.group(1) if init else ""
        for policy in algo_cls.policy_aliases.values():
            if policy.__name__ == name and policy.__module__ == item.get("__module__"):
                return policy
        raise KeyError(key)
    if key in ("observation_space", "action_space"):
        shape = item.get("_shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and 0 <= s < 1 << 20
                                                    for s in shape):
            raise ModelFileError(f"{where}: {key} has no readable shape")
        if env_spaces is not None:
            space = env_spaces[0 if key == "observation_space" else 1]
            return space
        if key == "observation_space":
            return gym.spaces.Box(-np.inf, np.inf, shape=tuple(shape), dtype=np.float32)
        n = int(str(item.get("n", "0")))
        if n < 1:
            raise ModelFileError(f"{where}: action_space has no readable size")
        return gym.spaces.Discrete(n)
    if key in ("lr_schedule", "clip_range", "clip_range_vf"):
        m = _CONST_RE.search(str(item.get("value_schedule", "")))
        if m is None:
            if key == "lr_schedule" and isinstance(data.get("learning_rate"), int | float):
                return FloatSchedule(ConstantSchedule(float(data["learning_rate"])))
            raise KeyError(key)  # a non-constant schedule would need its pickled code
        return FloatSchedule(ConstantSchedule(float(m.group(1))))
    if key == "exploration_schedule":
        try:
            return LinearSchedule(float(item["start"]), float(item["end"]),
                                  float(item["end_fraction"]))
        except (KeyError, TypeError, ValueError):
            raise KeyError(key) from None
    if key == "policy_kwargs":
        allowed = _allowed_classes()
        out: dict[str, Any] = {}
        for k, v in item.items():
            if k in (":type:", ":serialized:"):
                continue
            if isinstance(v, str) and (m := _CLASS_RE.fullmatch(v)):
                if m.group(1) not in allowed:
                    raise KeyError(f"{key}.{k}")
                out[k] = allowed[m.group(1)]
            else:
                out[k] = _plain(v, where, f"{key}.{k}")
        return out
    if key in ("_last_obs", "_last_episode_starts", "_last_original_obs"):
        return None  # training state only; SB3 resets before training again
    if key in ("ep_info_buffer", "ep_success_buffer"):
        return collections.deque(maxlen=int(data.get("_stats_window_size", 100) or 100))
    if key in ("rollout_buffer_class", "replay_buffer_class"):
        return None  # SB3 picks its default buffer for the algorithm
    if key == "train_freq":
        from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit

        return TrainFreq(4, TrainFrequencyUnit.STEP)  # SB3's default; training-only
    raise KeyError(key)


def read_model_zip(zpath: Path) -> tuple[bytes, dict[str, Any]]:
    """The archive's bytes and its parsed ``data`` JSON, checked to be a usable SB3 model."""
    where = echo_path(zpath)
    try:
        raw = read_bytes_limited(zpath, MAX_MODEL_BYTES, "SB3 model")
    except InputFileError as err:
        raise ModelFileError(str(err)) from None
    if not raw:
        raise ModelFileError(f"{where}: the model file is empty")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            names = set(zf.namelist())
            if "data" not in names:
                raise ModelFileError(f"{where}: not an SB3 model (no 'data' entry in the zip)")
            if "policy.pth" not in names:
                raise ModelFileError(f"{where}: not an SB3 model (no 'policy.pth' in the zip)")
            # sizes from the zip's directory, before anything is inflated: a small file
            # must not unpack into gigabytes
            for info in zf.infolist():
                cap = MAX_DATA_BYTES if info.filename == "data" else MAX_MODEL_BYTES
                if info.file_size > cap:
                    raise ModelFileError(
                        f"{where}: the zip entry {echo(info.filename)} unpacks to "
                        f"{info.file_size:,} bytes; expected at most {cap:,}")
            # and in all: 40 entries under the cap each took 26 s of CPU to test
            total = sum(info.file_size for info in zf.infolist())
            if total > MAX_MODEL_BYTES:
                raise ModelFileError(f"{where}: the zip unpacks to {total:,} bytes in all; "
                                     f"expected at most {MAX_MODEL_BYTES:,}")
            bad = zf.testzip()
            if bad is not None:
                raise ModelFileError(f"{where}: the zip entry {echo(bad)} is corrupted")
            text = zf.read("data").decode("utf-8")
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelFileError(f"{where}: not a readable zip archive (truncated or corrupted: "
                             f"{echo(str(err))})") from None
    try:
        data = loads_json_strict(text)
    except (ValueError, RecursionError):  # syntax, duplicate key, huge integer, nesting
        raise ModelFileError(f"{where}: the zip's 'data' entry is not valid JSON") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{where}: the zip's 'data' entry must be a JSON object")
    return raw, data


def safe_custom_objects(data: dict[str, Any], algo_cls: Any,
                        env_spaces: tuple[Any, Any] | None, where: str) -> dict[str, Any]:
    """``custom_objects`` for SB3's ``load`` replacing EVERY serialized entry of ``data``.

    Raises :class:`ModelFileError` naming the first entry that cannot be rebuilt safely.
    """
    out = {}
    for key, item in data.items():
        if isinstance(item, dict) and ":serialized:" in item:
            try:
                out[key] = _rebuild(key, item, algo_cls, env_spaces, data, where)
            except KeyError as err:
                raise ModelFileError(
                    f"{where}: the entry {echo(str(err.args[0]))!r} can only be loaded by "
                    f"unpickling, which can run code; refused ({_TRUST_HINT})") from None
    return out


def serialized_shape(data: dict[str, Any], key: str) -> tuple[int, ...] | None:
    """The shape SB3 wrote in readable form next to a serialized space (no unpickling)."""
    item = data.get(key)
    shape = item.get("_shape") if isinstance(item, dict) else None
    if isinstance(shape, list) and all(isinstance(s, int) for s in shape):
        return tuple(shape)
    return None


def serialized_n(data: dict[str, Any]) -> int | None:
    """``n`` of a serialized ``Discrete`` action space, if readable."""
    item = data.get("action_space")
    try:
        return int(str(item.get("n"))) if isinstance(item, dict) else None
    except ValueError:
        return None
