"""The ``intune`` command (the top layer: it may import every package below it).

- :mod:`agents.cli.main`: the click group, ``--plugin``, ``--version``, the error boundary;
- :mod:`agents.cli.scenarios`: ``scenarios list|show|generate``;
- :mod:`agents.cli.run`: ``run``; :mod:`agents.cli.agents_cmd`: ``agents``;
- :mod:`agents.cli.train_eval`: ``train``, ``eval``; :mod:`agents.cli.compare_cmd`: ``compare``;
- :mod:`intune_env.live.cli`: ``calibrate``, ``live-sweep`` (added by the group).

A user's fault prints one line ``intune: error: ...`` on stderr and exits 2.
"""

from agents.cli.main import main

__all__ = ["main"]
