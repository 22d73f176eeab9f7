"""Subcommands of the ``latticeflow`` CLI; each module defines ``register(subparsers)``.

A command's handler takes the parsed arguments and returns an exit code (0 on success). User
errors are raised as :class:`latticeflow.base.errors.LatticeflowError` and reported by the CLI.
"""
