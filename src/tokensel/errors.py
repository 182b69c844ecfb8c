"""User-facing errors: one clear line naming the file / line / key and the fix. The CLI prints them
without a traceback and exits with status 2."""


class TokenselError(Exception):
    """Bad input or configuration that the user can fix."""


class DataError(TokenselError, ValueError):
    """A malformed data file or row (the message names the file and line)."""


class ConfigError(TokenselError, ValueError):
    """A bad recipe key or value (the message names the key and the valid choices)."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message` of a third-party exception, for quoting inside one of ours."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__
