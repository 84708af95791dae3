"""User code that extends the package: stage models, agents.

A scenario file is data and never causes an import. Code is loaded only when asked:

- ``intune --plugin MODULE_OR_FILE.py`` (repeatable) names a module on ``sys.path`` or a
  Python file; importing it runs its ``@register_stage_model`` / ``register_agent`` calls;
- installed packages declare an entry point in the group :data:`ENTRY_POINT_GROUP`
  (``[project.entry-points."intune.plugins"] mine = "mypkg.intune_plugin"``); those load
  when the ``intune`` command starts (``--no-entry-points`` turns them off).

:func:`load_plugins` is idempotent, and ``intune compare`` passes the loaded specs to its
worker processes (local pool and Ray), which load them again before their first run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from simulators.fileio import echo

#: Entry-point group of installed plugins.
ENTRY_POINT_GROUP = "intune.plugins"

_LOADED: dict[str, str] = {}  # spec -> module name, in load order
_IMPORTED: dict[str, list[str]] = {}  # spec -> modules its import brought in (its code)
# spec -> what a worker process loads for it: a file's absolute path (a worker may run in
# another directory: Ray's do), a module's name, an entry point's key
_FOR_WORKERS: dict[str, str] = {}


class PluginError(ValueError):
    """A plugin that cannot be found or fails to import (one-line message)."""


def _import_file(path: Path) -> str:
    # A stable, private module name per file, so pickled references from a worker that
    # loaded the same file resolve to the same module.
    name = "intune_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return name
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {echo(str(path))}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return name


def load_plugin(spec: str) -> str:
    """Import one plugin (a ``.py`` file path or a module name); return its module name."""
    if spec in _LOADED:
        return _LOADED[spec]
    if spec.startswith("entry-point:"):  # a parent's installed plugins, in a worker
        load_entry_point_plugins()
        if spec not in _LOADED:
            raise PluginError(f"plugin {echo(spec)}: no such entry point installed here")
        return _LOADED[spec]
    before = set(sys.modules)
    worker_spec = spec
    try:
        if spec.endswith(".py") or "/" in spec or Path(spec).is_file():
            path = Path(spec).resolve()
            if not path.is_file():
                raise PluginError(f"plugin {echo(spec)}: no such file")
            name = _import_file(path)
            worker_spec = str(path)
        else:
            name = importlib.import_module(spec).__name__
    except PluginError:
        raise
    except ModuleNotFoundError as err:
        raise PluginError(f"plugin {echo(spec)}: no module named {echo(err.name)}") from None
    except Exception as err:  # the user's code failed while importing
        raise PluginError(f"plugin {echo(spec)} failed to import: "
                          f"{type(err).__name__}: {echo(str(err))}") from None
    _LOADED[spec] = name
    _IMPORTED[spec] = _own_modules(name, set(sys.modules) - before)
    _FOR_WORKERS[spec] = worker_spec
    return name


def _own_modules(name: str, new: set[str]) -> list[str]:
    """Of the modules a plugin's import brought in, those that are its code: its own
    package's, and any outside the Python installation (a helper next to a plugin file).
    Installed libraries it imports (numpy...) are not its code."""
    top = name.split(".", 1)[0]
    roots = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    own = []
    for mod in sorted(new):
        path = getattr(sys.modules.get(mod), "__file__", None)
        if not path:
            continue
        resolved = Path(path).resolve()
        if mod.split(".", 1)[0] == top or not any(r in resolved.parents for r in roots):
            own.append(mod)
    return own


def load_plugins(specs: list[str] | tuple[str, ...]) -> list[str]:
    """Import every plugin in ``specs`` (idempotent); return their module names."""
    return [load_plugin(s) for s in specs]


def load_entry_point_plugins() -> list[str]:
    """Import the plugins installed packages declare in :data:`ENTRY_POINT_GROUP`."""
    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"entry-point:{ep.name}={ep.value}"
        if key in _LOADED:
            continue
        before = set(sys.modules)
        try:
            ep.load()
        except Exception as err:
            dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed package"
            raise PluginError(f"plugin entry point {echo(ep.name)} ({echo(ep.value)}, from "
                              f"{echo(dist)}) failed to load: {type(err).__name__}: "
                              f"{echo(str(err))}; `intune --no-entry-points` skips installed "
                              f"plugins") from None
        _LOADED[key] = ep.value
        _FOR_WORKERS[key] = key
        _IMPORTED[key] = _own_modules(ep.value.split(":", 1)[0], set(sys.modules) - before)
        names.append(ep.value)
    return names


def loaded_plugins() -> list[str]:
    """What worker processes must load to have this process's plugins: plugin files by
    absolute path, modules by name, and the installed entry points loaded here (so
    ``--no-entry-points`` holds in workers too)."""
    return list(dict.fromkeys(_FOR_WORKERS[s] for s in _LOADED))


def plugins_digest() -> str:
    """SHA-256 over the source files of every plugin loaded so far ("" if none).

    Part of ``intune compare``'s run fingerprints: a plugin defines stage models and
    agents, so a result computed with an older version of its code must not be reused.
    Each plugin counts with the modules its import brought in that are its own code
    (:func:`_own_modules`: a helper module it imports, the rest of its package; an edit
    of a helper reused stale results), by module name, not by the spec as typed
    (``x.py`` and ``./x.py`` are one plugin). A module without a source file (an
    extension) counts by its name only.
    """
    if not _LOADED:
        return ""
    h = hashlib.sha256()
    for spec, name in _LOADED.items():
        module_name = name.split(":", 1)[0] if spec.startswith("entry-point:") else name
        for mod in sorted({module_name, *_IMPORTED.get(spec, [])}):
            h.update(mod.encode() + b"\0")
            path = getattr(sys.modules.get(mod), "__file__", None)
            if path and Path(path).is_file():
                h.update(Path(path).read_bytes())
            h.update(b"\0")
    return h.hexdigest()
