"""``asrd bench``: load generator and benchmarks of a running asrd (see docs/benchmarks.md).

* :mod:`asrd.bench.load`: N concurrent Alibaba-dialect sessions streaming real recordings
  at real time from one trio process (or several: :mod:`asrd.bench.shard`).
* :mod:`asrd.bench.stats`: percentiles and the stream-time -> send-time mapping.
* :mod:`asrd.bench.procs`: CPU and RSS of the processes under test, from ``/proc``.
* :mod:`asrd.bench.stack`: a private ``asrd serve`` stack (``--spawn``).
* :mod:`asrd.bench.baseline`: pocketsphinx alone, the limit service figures compare with.
* :mod:`asrd.bench.command`: the command line.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_commands"]


def add_commands(subparsers: Any) -> None:
    """Add ``asrd bench`` to the ``asrd`` command line (see asrd.cli.COMMAND_MODULES)."""
    from asrd.bench.command import add_commands as add

    add(subparsers)
