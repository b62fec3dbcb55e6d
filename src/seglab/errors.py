class SeglabError(Exception):
    """A problem with the user's data, config or files, explained in words they can act on.

    The entry points print these without a traceback and exit non-zero.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line report), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
