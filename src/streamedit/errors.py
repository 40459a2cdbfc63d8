"""The one exception type that carries a message meant for the user (the CLI prints it, exit 2)."""


class StreameditError(Exception):
    """A problem with the user's input or environment, explained in one line."""
