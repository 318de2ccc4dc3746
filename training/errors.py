"""The error of the trainer's parts that the user can fix, in a module of its own so that
every part (and the measuring code) raises it without importing another part for it."""


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""
