"""A YAML-lite reader: nested mappings by indentation, lists, scalars and comments; no library.

Supported: `key: value`, `key:` followed by an indented block, `- item` lists (of scalars or of
mappings), inline lists `[1, 2.5, "a"]`, inline mappings `{a: 1}`, `#` comments, quoted strings,
true/false/null, ints and floats. Anything else is a ConfigError with line and column; so is nesting
deeper than safejson.MAX_DEPTH (block or inline), which would otherwise end in a RecursionError.
"""
import json
import re

from lib.core import safejson
from lib.core.errors import ConfigError

_KEY = re.compile(r"^([A-Za-z_][\w.\-]*)\s*:(\s+|$)")


def _strip_comment(line: str) -> str:
    """Drop a `#` comment that is not inside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _at(where: str, line: int, col: int) -> str:
    """'file:line:col', or just `where` for text that has no lines (an override)."""
    return f"{where}:{line}:{col}" if line else where


def parse_scalar(text: str, where: str = "<text>", line: int = 0, col: int = 0):
    """One scalar or inline list/mapping, YAML-style (`true`, `null`, `1e-3`, `'a'`, `[1, 2]`)."""
    text = text.strip()
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "~", "none", ""):
        return None
    if text[0] in "[{":
        return _parse_flow(text, where, line, col)
    if text[0] in "\"'":
        if len(text) < 2 or text[-1] != text[0]:
            raise ConfigError(f"{_at(where, line, col)}: unterminated string {_short(text)}")
        return text[1:-1]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_flow(text: str, where: str, line: int, col: int):
    """Inline `[a, b]` / `{k: v}`: quote bare words, then read it as JSON."""
    token = re.compile(r'"[^"]*"|\'[^\']*\'|[\[\]{},:]|[^\[\]{},:\s][^\[\]{},:]*')
    parts = []
    for tok in token.findall(text):
        tok = tok.strip()
        if tok in "[]{},:":
            parts.append(tok)
        else:
            parts.append(json.dumps(parse_scalar(tok, where, line, col)))
    at = f"{_at(where, line, col)}: inline value {_short(text)}"
    try:
        value = json.loads("".join(parts))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{_at(where, line, col)}: cannot read inline value {_short(text)} ({exc.msg})") from None
    except RecursionError:
        raise ConfigError(f"{at}: nested deeper than {safejson.MAX_DEPTH} levels") from None
    safejson.check_depth(value, at)
    return value


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def loads(text: str, where: str = "<text>"):
    """Parse YAML-lite text into nested dicts/lists/scalars."""
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ConfigError(f"{where}:{number}:1: tab in indentation", hint="indent with spaces")
        body = _strip_comment(raw).rstrip()
        if body.strip():
            lines.append((number, len(body) - len(body.lstrip()), body.strip()))
    if not lines:
        return {}
    value, end = _block(lines, 0, lines[0][1], where)
    if end != len(lines):
        number, indent, _ = lines[end]
        raise ConfigError(f"{where}:{number}:{indent + 1}: unexpected indentation")
    safejson.check_depth(value, where)  # blocks and inline values together
    return value


def _block(lines, start, indent, where, depth: int = 1):
    """Read the mapping or list whose items sit at `indent`, from lines[start]; `depth` counts the blocks
    around it (each costs a Python frame, so it is bounded before the interpreter's recursion limit)."""
    if depth > safejson.MAX_DEPTH:
        raise ConfigError(f"{where}:{lines[start][0]}:{indent + 1}: nested deeper than {safejson.MAX_DEPTH} levels")
    if lines[start][2].startswith("- ") or lines[start][2] == "-":
        return _list_block(lines, start, indent, where, depth)
    result, i = {}, start
    while i < len(lines) and lines[i][1] == indent:
        number, _, body = lines[i]
        match = _KEY.match(body)
        if not match:
            raise ConfigError(f"{where}:{number}:{indent + 1}: expected `key: value`, found {body!r}")
        key, rest = match.group(1), body[match.end():].strip()
        if key in result:
            raise ConfigError(f"{where}:{number}:{indent + 1}: duplicate key {key!r}")
        i += 1
        if rest:
            result[key] = parse_scalar(rest, where, number, indent + match.end() + 1)
        elif i < len(lines) and lines[i][1] > indent:
            result[key], i = _block(lines, i, lines[i][1], where, depth + 1)
        else:
            result[key] = None
    if i < len(lines) and lines[i][1] > indent:
        number, deeper, _ = lines[i]
        raise ConfigError(f"{where}:{number}:{deeper + 1}: unexpected indentation")
    return result, i


def _list_block(lines, start, indent, where, depth: int):
    """Read `- item` lines at `indent`; an item may be a scalar or an inline/nested mapping."""
    result, i = [], start
    while i < len(lines) and lines[i][1] == indent and lines[i][2].startswith("-"):
        number, _, body = lines[i]
        item = body[1:].strip()
        i += 1
        if not item:
            if i < len(lines) and lines[i][1] > indent:
                value, i = _block(lines, i, lines[i][1], where, depth + 1)
            else:
                value = None
        elif _KEY.match(item):
            # `- key: value` starts a mapping whose other keys are indented under the key.
            sub = [(number, indent + 2, item)]
            while i < len(lines) and lines[i][1] > indent:
                sub.append(lines[i])
                i += 1
            value, _ = _block(sub, 0, indent + 2, where, depth + 1)
        else:
            value = parse_scalar(item, where, number, indent + 3)
        result.append(value)
    return result, i
