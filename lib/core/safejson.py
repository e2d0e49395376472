"""Bounded JSON reading: a nesting limit and one error class, so a hostile file names itself instead of
ending in RecursionError (json recurses per level) or a ValueError from a 5,000-digit integer."""
import json

from lib.core.errors import ConfigError, ForestGapsError

MAX_DEPTH = 64  # configs nest 4 deep, manifests 5, model cards 3: 64 is far above any file we write


def check_depth(value, where: str, error: type[ForestGapsError] = ConfigError, limit: int = MAX_DEPTH) -> None:
    """Raise `error` naming `where` when lists/dicts nest deeper than `limit` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list, tuple)):
            if depth > limit:
                raise error(f"{where}: nested deeper than {limit} levels")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


def loads(text: str | bytes | bytearray, where: str, error: type[ForestGapsError] = ConfigError,
          limit: int = MAX_DEPTH):
    """json.loads with every failure as `error` naming `where` (and line:column for syntax errors)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise error(f"{where}: nested deeper than {limit} levels") from None
    except ValueError as exc:  # not UTF-8, or an integer past Python's 4,300-digit limit
        raise error(f"{where}: invalid JSON: {str(exc)[:120]}") from None
    check_depth(value, where, error, limit)
    return value
