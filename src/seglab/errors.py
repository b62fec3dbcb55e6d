class SeglabError(Exception):
    """A problem with the user's data, config or files, explained in words they can act on.

    The entry points print these without a traceback and exit non-zero.
    """
