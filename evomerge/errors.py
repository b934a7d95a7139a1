"""The one exception type that means "the user's input is wrong"."""


class EvomergeError(Exception):
    """A problem a user can fix: the CLI prints it as one line and exits with status 2."""
