import re


class SeglabError(Exception):
    """A problem with the user's data, config or files, explained in words they can act on.

    The entry points print these without a traceback and exit non-zero.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line report), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# Query parameters that carry credentials in the addresses libraries put into their messages
# (RoboFlow's `?api_key=`, W&B's and others' `token=`, `access_token=`, `key=`).
SECRET_PARAMETER = re.compile(r"(?i)\b(api_key|access_token|token|key)=[^&\s'\")]+")


def without_secrets(text: str, *secrets: str | None) -> str:
    """text with every given secret and every credential query parameter replaced by ***: for messages built from
    a library's exception (a failed request's URL carries the key), which reach the console and train.log."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return SECRET_PARAMETER.sub(lambda m: f"{m.group(1)}=***", text)
