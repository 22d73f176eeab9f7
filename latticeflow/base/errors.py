"""User-facing errors: the CLI prints them as one line and exits non-zero."""

#: Exit codes of the command and the analysis scripts: success, a bug (a traceback), bad input
#: (a :class:`LatticeflowError` or a usage error, as one line), interrupted (Ctrl-C).
EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class LatticeflowError(Exception):
    """A problem with the user's input (file, option, parameter) rather than a bug."""


class ConfigError(LatticeflowError):
    """A TOML card or recipe that cannot be used; the message names the file and the key."""

    def __init__(self, source: str, key: str | None, problem: str):
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")
        self.source, self.key, self.problem = source, key, problem
