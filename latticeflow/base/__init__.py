"""Base services: what every layer may use, with no physics in it.

* :mod:`~latticeflow.base.errors`: :class:`LatticeflowError`, :class:`ConfigError` and the exit
  codes;
* :mod:`~latticeflow.base.console`: log records to the terminal;
* :mod:`~latticeflow.base.device`: device and dtype selection;
* :mod:`~latticeflow.base.locking`: advisory file locks between latticeflow processes;
* :mod:`~latticeflow.base.distributed`: multi-process runs under ``torchrun``;
* :mod:`~latticeflow.base.toml_fields`: strict reading of TOML tables (action cards, recipes).

The package imports nothing itself: ``import latticeflow`` (and the command line) stays cheap.
"""
