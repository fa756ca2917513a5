"""One exception type for everything a user can get wrong; the CLI prints it without a traceback."""


class VoxcError(Exception):
    """A problem with the user's input, files or environment, explained in the message."""
