"""The errors emq raises on purpose; every module may import them, so they sit at the bottom.

Each is raised with a one-line message that names the problem and, where there is one, the fix.
"""


class ConfigError(ValueError):
    """A bad config key, value or file; the message is one line naming the problem."""


class DataError(RuntimeError):
    """A missing or corrupt dataset; the message is one line saying what to do."""
