"""Reading specs as every YAML consumer reads them, or not at all (docs/spec.md, "Validation").

A spec is read by PyYAML here, by Go's YAML 1.1 library in kubectl, helm and the apiserver, and by
YAML 1.2 tools (kustomize) elsewhere; the three disagree on some plain scalars. `load_yaml` resolves
plain scalars by the rules they share (JSON-like: null, true/false, decimal and hex integers, decimal
floats) and refuses, with file:line:column, what they read differently:

- YAML 1.1 boolean words `y n yes no on off` (any case) unquoted, as a key or a value: kubectl reads
  the key `n:` as `false`, kustomize reads the value `yes` as a string;
- numbers with a leading zero, `0o`/`0b` prefixes or `_` separators (010 is 8 in YAML 1.1, 10 in 1.2);
- duplicate keys (PyYAML keeps the last silently, the apiserver's strict mode refuses them);
- keys that are not strings, recursive aliases, and tags other than the core ones.

YAML that could exhaust the machine is refused before it is built, each with one line naming the file
and line: more than `MAX_CHARS` characters, nesting deeper than `MAX_DEPTH` (PyYAML's composer recurses and
would end in a RecursionError), more than `MAX_ALIASES` aliases, or aliases that expand to more than
`MAX_VALUES` values ("billion laughs": nine levels of nine aliases are 387 million strings). The limits are
checked on the parser's event stream, which holds one value at a time.

Anything else plain is a string, as kubectl reads it (dates, `1:20`). Whole numbers written as floats
(`5.0`) are integers, as on the apiserver (JSON has one number type). `load_yaml` also returns the line
of every path, so schema errors can name the line. `dump_yaml` writes YAML that `load_yaml` and Go read
back unchanged (strings that would resolve otherwise are quoted).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import yaml

from wrpo.errors import SpecError

Path = tuple[str | int, ...]
_PLAIN = "!wrpo/plain"  # the tag our resolver gives every plain scalar; resolved in `_scalar`

NULLS = frozenset({"", "~", "null", "Null", "NULL"})
BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
YAML11_BOOLS = frozenset({"y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO",
                          "on", "On", "ON", "off", "Off", "OFF"})
_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_HEX = re.compile(r"[-+]?0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_INF = re.compile(r"[-+]?\.(inf|Inf|INF)")
_NAN = frozenset({".nan", ".NaN", ".NAN"})
# Numbers YAML 1.1 and 1.2 read differently: 010 (8 or 10), 0o17, 0b101, 1_000 (1000 or a string).
_AMBIGUOUS_NUMBER = re.compile(r"[-+]?(0[0-9_]+(\.[0-9_]*)?|0o[0-7_]+|0b[01_]+|[0-9][0-9_]*_[0-9_]*(\.[0-9_]*)?)")
_MAX_EXACT = 2**53  # beyond this a float is not a JSON integer for the apiserver either

#: Limits of one document (a spec is a few kilobytes; a FusionRun is at most about 1.5 MB in etcd).
MAX_CHARS = 256 * 1024
MAX_DEPTH = 64
MAX_ALIASES = 1000
MAX_VALUES = 20_000

_CORE_TAGS = {
    "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq",
}


#: libyaml's parser (PyYAML's wheels bundle it): the pure-Python scanner takes seconds per megabyte and grows
#: quadratically with flow nesting, so a limit would not be reached within a second.
_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Parser):  # type: ignore[misc, valid-type]
    """Composes nodes only; plain scalars keep their text (tag `_PLAIN`) for `_scalar` to resolve."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        if kind is yaml.ScalarNode and implicit[0]:
            return _PLAIN
        return super().resolve(kind, value, implicit)


_Loader.yaml_implicit_resolvers = {}


class YamlProblems(list[str]):
    """`file:line:column: message` lines, collected over the whole document (an aliased node once)."""

    def append(self, line: str) -> None:
        if line not in self:
            super().append(line)


def _short(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


def _where(source: str, node: yaml.Node | yaml.Event) -> str:
    return f"{source}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def quote(text: str) -> str:
    """'text' for a message, JSON-escaped when it holds a line break or another unprintable character (one line)."""
    return f"'{text}'" if text.isprintable() else json.dumps(text)


def json_number(value: float) -> float | int:
    """A whole float as an int (5.0 -> 5), as the apiserver stores JSON numbers."""
    if math.isfinite(value) and value == int(value) and abs(value) < _MAX_EXACT:
        return int(value)
    return value


def resolve_plain(text: str) -> tuple[Any, str | None]:
    """A plain scalar's value, or (None, why) when YAML parsers disagree on it."""
    if text in NULLS:
        return None, None
    if text in BOOLS:
        return BOOLS[text], None
    if text in YAML11_BOOLS:
        word = "true" if text.lower() in ("y", "yes", "on") else "false"
        return None, (f"'{text}' is the boolean {word} in YAML 1.1 (kubectl, helm) but a string in YAML 1.2 "
                      f"(kustomize); write {word} for a boolean, or quote it ('{text}') for a string")
    if _INT.fullmatch(text):
        return int(text), None
    if _HEX.fullmatch(text):
        return int(text, 16), None
    if _AMBIGUOUS_NUMBER.fullmatch(text):
        return None, (f"'{text}' is read as different numbers by YAML 1.1 and 1.2 parsers; write it in plain "
                      "decimal without leading zeros or '_', or quote it for a string")
    if _FLOAT.fullmatch(text):
        return json_number(float(text)), None
    if _INF.fullmatch(text):
        return (-math.inf if text.startswith("-") else math.inf), None
    if text in _NAN:
        return math.nan, None
    return text, None


def _explicit(node: yaml.ScalarNode) -> Any:
    tag, text = node.tag, node.value
    if tag == "tag:yaml.org,2002:str":
        return text
    if tag == "tag:yaml.org,2002:null":
        return None
    value, _ = resolve_plain(text)
    kinds = {"tag:yaml.org,2002:int": int, "tag:yaml.org,2002:float": (int, float),
             "tag:yaml.org,2002:bool": bool}
    expected = kinds.get(tag)
    if expected is None or not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"{quote(text)} is not a valid {tag.rsplit(':', 1)[-1]}")
    return value


def _limits(text: str, source: str) -> None:
    """SpecError at the first limit `text` exceeds (see the module doc); YAML errors are left to the composer."""
    if len(text) > MAX_CHARS:
        line = text.count("\n", 0, MAX_CHARS) + 1
        raise SpecError(f"{source}:{line}: longer than {MAX_CHARS} characters; a spec is a few kilobytes")
    expanded: dict[str, tuple[int, int]] = {}  # anchor -> (values, depth) of its node with every alias expanded
    open_: list[list[Any]] = [[0, 0, None]]  # per open collection: [values, depth below, anchor]
    total = aliases = 0

    def add(values: int, depth: int, event: yaml.Event) -> None:
        nonlocal total
        total += values
        open_[-1][0] += values
        open_[-1][1] = max(open_[-1][1], depth)
        if total > MAX_VALUES:
            what = f" (here: alias *{event.anchor})" if isinstance(event, yaml.AliasEvent) else ""
            raise SpecError(f"{_where(source, event)}: aliases expand to more than {MAX_VALUES} values{what}; "
                            "write the values out")
        if len(open_) - 1 + depth > MAX_DEPTH:
            raise SpecError(f"{_where(source, event)}: nesting deeper than {MAX_DEPTH} levels"
                            + (f" (alias *{event.anchor} expanded)" if isinstance(event, yaml.AliasEvent) else ""))

    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.CollectionStartEvent):
                add(1, 1, event)
                open_.append([0, 0, event.anchor])
            elif isinstance(event, yaml.CollectionEndEvent):
                values, depth, anchor = open_.pop()
                open_[-1][0] += values  # the parent holds them too (already counted in `total`)
                open_[-1][1] = max(open_[-1][1], depth + 1)
                if anchor:
                    expanded[anchor] = (values + 1, depth + 1)
            elif isinstance(event, yaml.ScalarEvent):
                if event.anchor:
                    expanded[event.anchor] = (1, 0)
                add(1, 0, event)
            elif isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_ALIASES:
                    raise SpecError(f"{_where(source, event)}: more than {MAX_ALIASES} aliases; write the values out")
                add(*expanded.get(event.anchor, (1, 0)), event)  # an open anchor is a recursive alias (refused later)
    except yaml.YAMLError as e:  # the composer reports it, except libyaml's own depth limit (1000)
        if "nesting depth" in str(getattr(e, "problem", "")) and getattr(e, "problem_mark", None):
            raise SpecError(f"{source}:{e.problem_mark.line + 1}:{e.problem_mark.column + 1}: nesting deeper than "
                            f"{MAX_DEPTH} levels") from None


def _yaml_error(e: yaml.YAMLError, text: str, source: str) -> str:
    """One line: `source:line: not valid YAML (problem)`."""
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow; it has a position, not a mark
        line = text.count("\n", 0, e.position) + 1
        char = e.character if isinstance(e.character, int) else ord(e.character[:1] or "\0")
        return f"{source}:{line}: not valid YAML (character #x{char:04x}: {e.reason})"
    mark = getattr(e, "problem_mark", None)
    where = f"{source}:{mark.line + 1}" if mark else source
    problem = " ".join((getattr(e, "problem", None) or str(e)).split())
    return f"{where}: not valid YAML ({problem})"


def load_yaml(text: str, source: str) -> tuple[Any, dict[Path, int]]:
    """(data, line of every path) of one YAML document; SpecError listing every problem (see module doc)."""
    _limits(text, source)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise SpecError(_yaml_error(e, text, source)) from None
    problems = YamlProblems()
    lines: dict[Path, int] = {}
    data = _build(root, (), source, problems, lines, set()) if root is not None else None
    if problems:
        raise SpecError("\n".join(problems))
    return data, lines


def _build(node: yaml.Node, path: Path, source: str, problems: YamlProblems, lines: dict[Path, int],
           active: set[int]) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in active:
        problems.append(f"{_where(source, node)}: recursive alias")
        return None
    if isinstance(node, yaml.ScalarNode):
        return _scalar(node, source, problems)
    if node.tag not in _CORE_TAGS:
        problems.append(f"{_where(source, node)}: tag {_short(node.tag)} is not supported")
        return None
    active.add(id(node))
    try:
        if isinstance(node, yaml.SequenceNode):
            return [_build(item, (*path, i), source, problems, lines, active) for i, item in enumerate(node.value)]
        return _mapping(node, path, source, problems, lines, active)
    finally:
        active.discard(id(node))


def _scalar(node: yaml.ScalarNode, source: str, problems: YamlProblems) -> Any:
    if node.tag == _PLAIN:
        value, why = resolve_plain(node.value)
        if why:
            problems.append(f"{_where(source, node)}: {why}")
        return value
    if node.tag not in _CORE_TAGS:
        problems.append(f"{_where(source, node)}: tag {_short(node.tag)} is not supported (only !!str, !!int, "
                        "!!float, !!bool, !!null)")
        return None
    try:
        return _explicit(node)
    except ValueError as e:
        problems.append(f"{_where(source, node)}: {e}")
        return None


def _is_merge(key: yaml.Node) -> bool:
    return isinstance(key, yaml.ScalarNode) and key.tag == _PLAIN and key.value == "<<"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    return f"the number {value}"


def _mapping(node: yaml.MappingNode, path: Path, source: str, problems: YamlProblems, lines: dict[Path, int],
             active: set[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        if _is_merge(key_node):
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            problems.append(f"{_where(source, key_node)}: a key must be a string, not a collection")
            continue
        if key_node.tag == _PLAIN and key_node.value in YAML11_BOOLS:
            word = "true" if key_node.value.lower() in ("y", "yes", "on") else "false"
            problems.append(f"{_where(source, key_node)}: the key '{key_node.value}' is read as the boolean {word} "
                            f"by YAML 1.1 parsers (kubectl, helm); quote it: '{key_node.value}':")
            continue
        key = _scalar(key_node, source, problems)
        if not isinstance(key, str):
            problems.append(f"{_where(source, key_node)}: key {quote(key_node.value)} is read as {_describe(key)}; "
                            "keys must be strings (quote it)")
            continue
        if key in out:
            problems.append(f"{_where(source, key_node)}: duplicate key {quote(key)} (first on line "
                            f"{lines[(*path, key)]})")
            continue
        lines[(*path, key)] = key_node.start_mark.line + 1
        out[key] = _build(value_node, (*path, key), source, problems, lines, active)
    # `<<: *anchor` (or a list of them): keys not written here come from the merged mappings, earlier first
    for key_node, value_node in node.value:
        if not _is_merge(key_node):
            continue
        for merged in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
            if not isinstance(merged, yaml.MappingNode):
                problems.append(f"{_where(source, merged)}: '<<' merges mappings only")
                continue
            their_lines: dict[Path, int] = {}
            data = _build(merged, path, source, problems, their_lines, active)
            for key, value in (data or {}).items():
                if key not in out:
                    out[key] = value
                    lines.update({p: n for p, n in their_lines.items() if p[:len(path) + 1] == (*path, key)})
    return out


# ---------------------------------------------------------------------------------------------- writing


class _Dumper(yaml.SafeDumper):
    """Quotes every string that `load_yaml` (or a YAML 1.1 parser) would not read back as that string."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    resolved, why = resolve_plain(value)
    needs_quotes = why is not None or resolved != value or not isinstance(resolved, str)
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="'" if needs_quotes else None)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    """YAML text (keys in order) that `load_yaml`, PyYAML and Go's YAML 1.1 all read back as `data`."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100000)
