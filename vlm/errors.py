"""Errors a user can cause. Each message names the thing and the fix; the CLI prints it as one line,
without a traceback. Specific errors live next to their code and subclass :class:`UserError`
(``vlm.config.ConfigError``, ``vlm.registry.SpecError``, ``DataError`` here)."""


class UserError(ValueError):
    """Base for errors the CLI reports as one line (bad path, bad input, unknown name, bad config key)."""


class DataError(UserError):
    """Bad data given by the user outside a stream (a missing shard, an unreadable row file...)."""
