"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (model, cluster, options, plan). The message names the problem and the fix."""


class UnsupportedModelError(UserError):
    """The model uses something alpa-plan cannot plan; the message lists every problem at once."""
