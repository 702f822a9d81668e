"""The one exception type for a user's mistake: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input the user can fix (a missing file, a wrong column, an existing output).

    The message names the file or value and the problem, in one line.
    """


class NoSpaceError(UserError):
    """The disk is full: a batch stops here rather than fail every scan that follows."""
