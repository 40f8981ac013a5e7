"""The one exception type that means "the user gave us something we cannot use"."""


class UserError(Exception):
    """Bad input. The CLI prints ``str(err)`` as one line on stderr and exits with code 2."""
