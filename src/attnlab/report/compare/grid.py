"""DVC's `-S` grammar, and the values a grid of `-S` specs gives each param of the experiments it queues.

`dvc exp run --queue -S SPEC ...` reads every SPEC in Hydra's override grammar. `parse_override` reads the part of
it that params use (DVC pulls Hydra in, but Hydra is no dependency of ours):

    key=value            one value: 3, 0.5, 1e-3, true, null, text, 'quoted, text', "quoted", [a,list],
                         {a: mapping} (lists and mappings of any of these)
    key=v1,v2,...        a sweep: one experiment per value; several sweeps queue their cartesian product
    key=range(a,b[,s])   a sweep over a, a+s, ... below b (s: 1 by default; range(b) starts at 0)
    key=choice(v1,...)   a sweep over the values given
    +key=v, ++key=v      add or set key (here the same as key=v)
    ~key, ~key=v         delete key

A value's type is Hydra's: an unquoted 3 is an int, 0.5 or inf a float, true/false a bool, null None, and any
other text (inner spaces kept, outer spaces dropped) a string; a quoted value is always a string. Outside quotes
a backslash escapes `\\ , ( ) [ ] { } : =`, a space or a tab; inside quotes it escapes the quote and the
backslashes before it. The rest of Hydra's grammar (other functions such as sort() or interval(),
interpolations `${...}`, config groups `a/b`, `@package`) is an error here rather than a guess.
"""

from __future__ import annotations

import decimal
import re
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from attnlab.core.errors import ConfigError

KEY = re.compile(r"(?:[A-Za-z_$][\w$-]*|\d+)(?:\.(?:[A-Za-z_$][\w$-]*|\d+))*", re.ASCII)
_UINT = r"(?:0|[1-9](?:_?[0-9])*)"
_DIGITS = r"[0-9](?:_?[0-9])*"
_POINT = rf"(?:{_UINT}\.|{_UINT}?\.{_DIGITS})"
INT = re.compile(rf"[+-]?{_UINT}")
FLOAT = re.compile(rf"[+-]?(?:(?:{_POINT}|{_UINT})e[+-]?{_DIGITS}|{_POINT}|inf|nan)", re.IGNORECASE)
UNQUOTED = set(string.ascii_letters + string.digits + "_-/\\+.$%*@?|: \t")  # characters of an unquoted value
ESCAPED = set("\\()[]{}:=, \t")  # what a backslash escapes outside quotes
FUNCTION = re.compile(r"\s*([A-Za-z_]\w*)\s*\(", re.ASCII)  # range( or choice(


@dataclass(frozen=True)
class Override:
    """One -S spec: the key, the values its experiments get (one, or a sweep's in order), or a deletion."""

    key: str
    values: tuple = ()
    delete: bool = False


def parse_override(spec: str) -> Override:
    """One `-S` spec of `dvc exp run`, read as DVC reads it (the grammar is in this module's docstring)."""
    prefix = re.match(r"~|\+\+|\+|", spec).group()
    key, equal, text = spec[len(prefix):].partition("=")
    if not KEY.fullmatch(key):
        raise _error(spec, f"{key!r} is not a param key (dotted names of letters, digits, _ and -)")
    if prefix == "~":
        return Override(key, delete=True)
    if not equal:
        raise _error(spec, "expected key=value (or ~key to delete the key)")
    try:
        return Override(key, tuple(_Reader(text, offset=len(spec) - len(text)).values()))
    except ValueError as exc:
        raise _error(spec, str(exc)) from None


def _error(spec: str, reason: str) -> ConfigError:
    return ConfigError("--grid/-S", f"cannot parse {spec} as DVC's -S syntax: {reason}")


class _Reader:
    """A value of a spec read from left to right; a ValueError says where it stops making sense."""

    def __init__(self, text: str, offset: int = 0):
        self.text, self.at, self.offset = text, 0, offset  # offset: where the text starts in its spec

    def where(self, at: int | None = None) -> str:
        """'character N' of the spec, counted from 1."""
        return f"character {self.offset + (self.at if at is None else at) + 1}"

    def peek(self) -> str:
        return self.text[self.at : self.at + 1]

    def skip_spaces(self) -> None:
        while self.peek() in (" ", "\t") and self.peek():
            self.at += 1

    def expect(self, char: str) -> None:
        self.skip_spaces()
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "the end"
            raise ValueError(f"expected {char!r} at {self.where()}, found {found}")
        self.at += 1

    def values(self) -> list:
        """The whole value: one element, a comma list of them (a sweep), or range(...) / choice(...)."""
        call = FUNCTION.match(self.text)
        if call:
            self.at = call.end()
            values = self.call(call.group(1))
        else:
            values = self.elements(empty_ok=True)
        self.skip_spaces()
        if self.peek():
            raise ValueError(f"unexpected {self.peek()!r} at {self.where()}")
        return values

    def elements(self, empty_ok: bool = False) -> list:
        """Elements separated by commas (the value `x=` alone is the empty string)."""
        items = [self.element(empty_ok)]
        while self.peek() == ",":
            self.at += 1
            items.append(self.element())
        return items

    def call(self, name: str) -> list:
        args = self.elements()
        self.expect(")")
        if name == "choice":
            return args
        if name != "range":
            raise ValueError(f"{name}() is not supported (range() and choice() are)")
        if len(args) > 3:
            raise ValueError(f"range() takes 1 to 3 numbers, not {len(args)}")
        return _range(*args)

    def element(self, empty_ok: bool = False):
        """A list, a mapping, a quoted string or an unquoted value; stops before the next , ] } or )."""
        self.skip_spaces()
        first = self.peek()
        if first == "[":
            return self.bracketed("]", self.element)
        if first == "{":
            return dict(self.bracketed("}", self.entry))
        if first in ("'", '"'):
            return self.quoted(first)
        return self.unquoted(empty_ok=empty_ok)

    def bracketed(self, closing: str, item) -> list:
        """The items of a [list] or {mapping} (the reader is on its opening bracket)."""
        self.at += 1
        self.skip_spaces()
        if self.peek() == closing:
            self.at += 1
            return []
        items = [item()]
        while self.peek() == ",":
            self.at += 1
            items.append(item())
        self.expect(closing)
        return items

    def entry(self) -> tuple:
        key = self.unquoted(stop=":")
        self.expect(":")
        return key, self.element()

    def quoted(self, quote: str) -> str:
        """A quoted string: backslashes stay as they are, but for a run of them before a quote, which keeps half
        of them and, when the run is odd, escapes that quote."""
        start, self.at = self.at, self.at + 1
        out, backslashes = [], 0
        while True:
            char = self.peek()
            if not char:
                raise ValueError(f"the quote at {self.where(start)} is never closed")
            self.at += 1
            if char == "\\":
                backslashes += 1
                continue
            if char != quote:
                out.append("\\" * backslashes + char)
            elif backslashes % 2 == 0:  # the closing quote
                out.append("\\" * (backslashes // 2))
                break
            else:
                out.append("\\" * (backslashes // 2) + quote)
            backslashes = 0
        self.skip_spaces()
        if self.peek() not in ("", ",", "]", "}", ")"):
            raise ValueError(f"unexpected {self.peek()!r} after the quoted string at {self.where(start)}")
        return "".join(out)

    def unquoted(self, stop: str = "", empty_ok: bool = False):
        """Text up to the next separator, outer spaces dropped, typed by _typed unless a character was escaped."""
        chars: list[tuple[str, bool]] = []  # (character, escaped)
        while self.peek() and self.peek() not in ",]})" + stop:
            char, after = self.peek(), self.text[self.at + 1 : self.at + 2]
            if char == "\\" and after and after in ESCAPED:
                chars.append((after, True))
                self.at += 2
                continue
            if char == "$" and after == "{":
                raise ValueError("interpolations (${...}) are not supported")
            if char not in UNQUOTED:
                hint = "quotes or a backslash before it" if char in ESCAPED else "quotes"
                raise ValueError(f"{char!r} at {self.where()} needs {hint}")
            chars.append((char, False))
            self.at += 1
        while chars and chars[0] in ((" ", False), ("\t", False)):
            chars.pop(0)
        while chars and chars[-1] in ((" ", False), ("\t", False)):
            chars.pop()
        if not chars and not (empty_ok and not self.peek()):
            raise ValueError(f"a value is missing at {self.where()}")
        text = "".join(c for c, _ in chars)
        return text if any(escaped for _, escaped in chars) else _typed(text)


def _typed(text: str):
    """An unquoted value as Hydra types it: int, float, bool, None, else the text."""
    if INT.fullmatch(text):
        return int(text)
    if FLOAT.fullmatch(text):
        return float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "null":
        return None
    return text


def _range(start, stop=None, step=1) -> list:
    """Hydra's range(): Python's for ints, else start, start + step, ... added up exactly (as decimals)."""
    if stop is None:
        start, stop = 0, start
    bounds = (start, stop, step)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds):
        raise ValueError(f"range() takes numbers, not {', '.join(repr(v) for v in bounds)}")
    if step == 0:
        raise ValueError("range() needs a step other than 0")
    if all(isinstance(v, int) for v in bounds):
        return list(range(start, stop, step))
    value, end, by = (decimal.Decimal(v) for v in bounds)
    out = []
    while (value < end) if by > 0 else (value > end):
        out.append(float(value))
        value += by
    return out


# ------------------------------------------------------------------------------- params and grids


def flat_params(path: str | Path) -> dict:
    """params.yaml flattened as DVC flattens it: nested mappings joined with dots, lists kept whole."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must be a YAML mapping")
    return flatten(data)


def flatten(data: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; an empty mapping leaves no key, as in DVC."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cell(value):
    """A param value as exp_show reports it: str() of the value, then a float where it parses as one."""
    if value is None:
        return "None"
    if isinstance(value, float):
        return value
    text = str(value)
    try:
        return float(text)
    except ValueError:
        return text


def grid_values(base: dict, specs: list[str]) -> dict[str, list]:
    """key -> the values (as cell()) a param takes in the experiments that `dvc exp run --queue -S spec ...`
    queues on top of the flat params `base`: a sweep's values for swept keys, one value for the others.
    Later specs win, as in DVC."""
    allowed = {key: [cell(value)] for key, value in base.items()}
    for spec in specs:
        override = parse_override(spec)
        key = override.key
        if override.delete:
            allowed = {k: v for k, v in allowed.items() if k != key and not k.startswith(key + ".")}
        elif any(isinstance(v, dict) for v in override.values):
            if len(override.values) > 1:
                raise ConfigError("--grid/-S", f"{spec!r}: a sweep over mappings is not supported")
            allowed.update({k: [cell(v)] for k, v in flatten(override.values[0], key + ".").items()})
        else:
            allowed[key] = [cell(v) for v in override.values]
    return allowed


class Selection:
    """Which experiments to render: the grids (each a dict key -> allowed values, see grid_values) on top of
    the params file and the -S profile, parsed and checked before DVC is asked anything."""

    def __init__(self, params_path: str | Path, sets: list[str] = (), grids: list[list[str]] = ()):
        self.sets, self.grids = list(sets), [list(g) for g in grids]
        self.params_path = params_path
        base = flat_params(params_path)
        self.selectors = [grid_values(base, [*self.sets, *grid]) for grid in self.grids]
        self.keys = sorted(set(base).union(*self.selectors))

    def describe(self) -> str:
        grids = f" in the grid(s) {' | '.join(' '.join(g) for g in self.grids)}" if self.grids else ""
        return grids + (f" on top of {' '.join(self.sets)}" if self.sets else "")
