"""Worker processes of the live pipeline's stateless stages.

A worker process runs one stage's registered function (:data:`stages.STAGE_FUNCS`) on
the items its proxy thread sends it over a socket, and sends back ``("ok", result)`` or
``("err", traceback)``. It is started as ``python -c`` (never through ``multiprocessing``,
so the user's ``__main__`` is not re-imported) and dies with its parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def _die_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this process when its parent dies (no orphans on kill -9)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the EOF on the socket still ends the worker
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def child_entry(fd: int, parent_pid: int) -> None:
    """Main loop of a worker process: receive an item, send back ("ok", out) or ("err", tb).

    Started as ``python -c`` rather than through ``multiprocessing`` so that it never
    re-imports the user's ``__main__`` (scripts without a main guard keep working).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent(parent_pid)
    conn = Connection(fd)
    try:
        stage, params = conn.recv()
    except (EOFError, OSError):
        return
    from intune_env.live.stages import STAGE_FUNCS  # late: the boot stubs come first

    fn = STAGE_FUNCS[stage]
    cache: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent gone
        if msg is None:
            return
        try:
            out = fn(msg, params, cache)
        except BaseException as err:  # report, the parent decides
            reply: tuple[str, Any] = (
                "err", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        else:
            reply = ("ok", out)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# Bare package stubs let the worker import this module without running the package
# __init__ files (which import gymnasium, the simulator...): a worker starts 3x faster.
_CHILD_BOOT = """\
import sys, types
from pathlib import Path
pkg = Path({pkg!r})
for name, path in (("intune_env", pkg), ("intune_env.live", pkg / "live")):
    if name not in sys.modules:
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
from intune_env.live.processes import child_entry
child_entry({fd}, {ppid})
"""


def spawn_worker_process(stage: str, params: dict[str, Any]
                          ) -> tuple[subprocess.Popen, Connection]:
    """Start a worker process for ``stage``; return it and our end of its socket."""
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    code = _CHILD_BOOT.format(pkg=str(Path(__file__).resolve().parents[1]), fd=fd,
                              ppid=os.getpid())
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(fd,), env=env,
                                stdin=subprocess.DEVNULL, close_fds=True)
    finally:
        theirs.close()
    conn = Connection(ours.detach())
    try:
        conn.send((stage, params))
    except OSError:
        proc.kill()
        proc.wait()
        conn.close()
        raise
    return proc, conn
