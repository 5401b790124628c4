"""Read YAML keeping the line of every value, so later errors can name file:line."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import Problem, WanError

# A YAML alias bomb expands a few lines into billions of nodes: refuse past this many.
MAX_NODES = 200_000
MAX_FILE_BYTES = 1_000_000


@dataclass
class Document:
    """A loaded YAML file: plain data plus the line of every path in it."""

    file: str
    data: Any
    lines: dict[tuple, int] = field(default_factory=dict)

    def line(self, path: tuple | list) -> int:
        """The line of the value at path, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)


def where(path: tuple | list) -> str:
    """A path as the user reads it: lans[1], dns.records.hobbit."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Builder:
    def __init__(self, doc: Document):
        self.doc = doc
        self.count = 0
        self.constructor = yaml.SafeLoader("")

    def build(self, node: yaml.Node, path: tuple, key_line: int | None = None) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooBig()
        self.doc.lines[path] = (key_line or node.start_mark.line) + 1
        if isinstance(node, yaml.MappingNode):
            self.constructor.flatten_mapping(node)
            out: dict = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise _Bad(key_node.start_mark.line + 1, where(path), "a mapping key must be a plain value")
                key = self.constructor.construct_object(key_node)
                if not isinstance(key, str):
                    key = str(key) if isinstance(key, (int, float, bool)) or key is None else key
                if key in out:
                    raise _Bad(key_node.start_mark.line + 1, where(path + (key,)),
                               f"duplicate key {key!r}; remove one of the two")
                out[key] = self.build(value_node, path + (key,), key_node.start_mark.line)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        return self.constructor.construct_object(node)


class _TooBig(Exception):
    pass


class _Bad(Exception):
    def __init__(self, line: int, path: str, message: str):
        self.line, self.path, self.message = line, path, message


def load_yaml(path: Path, display: str | None = None) -> Document:
    """Load one YAML file into a Document; raise WanError (with the parser's line) if it is bad."""
    name = display or str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise WanError([Problem(name, 0, "", f"cannot read the file: {e.strerror}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise WanError([Problem(name, 0, "", f"the file is larger than {MAX_FILE_BYTES} bytes; a site file is a few hundred")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WanError([Problem(name, raw[: e.start].count(b"\n") + 1, "",
                                "the file is not UTF-8 text; save it as UTF-8")]) from None
    doc = Document(name, None)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        what = e.problem or "malformed YAML"
        raise WanError([Problem(name, line, "", f"malformed YAML: {what}; fix the syntax on this line")]) from None
    except yaml.YAMLError as e:  # pragma: no cover - pyyaml raises marked errors for text input
        raise WanError([Problem(name, 1, "", f"malformed YAML: {e}")]) from None
    if node is None:
        raise WanError([Problem(name, 1, "", "the file is empty; see sites/ for an example")])
    try:
        doc.data = _Builder(doc).build(node, ())
    except _TooBig:
        raise WanError([Problem(name, 1, "", f"the document expands to more than {MAX_NODES} values (an alias bomb?); write it out plainly")]) from None
    except _Bad as e:
        raise WanError([Problem(name, e.line, e.path, e.message)]) from None
    except yaml.constructor.ConstructorError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 1
        raise WanError([Problem(name, line, "", f"unsupported YAML value: {e.problem}; use plain strings, numbers, lists and mappings")]) from None
    except RecursionError:
        raise WanError([Problem(name, 1, "", "the document nests too deeply (a recursive alias?); write it out plainly")]) from None
    return doc
