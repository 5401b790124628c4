"""Read YAML keeping the line of every value, so later errors can name file:line.

Everything a hostile file can do to the reader is bounded here, before it grows: the file's size,
its nesting depth, the number of aliases, the number of values after aliases and merge keys are
expanded (a 760-byte merge-key chain took over 1 GB in pyyaml's own `flatten_mapping`, which is
therefore not used), control and format characters in any string, and numbers written in one of
YAML 1.1's surprising forms (`010` is 8, `1:30` is 90). A file's content is never echoed whole.
"""
from __future__ import annotations

import os
import re
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import Problem, WanError

MAX_FILE_BYTES = 256 * 1024  # a site file is a few hundred bytes, a 500-site wan.yaml a few kB
MAX_NODES = 200_000  # values after expanding aliases and merge keys
MAX_ALIASES = 100  # `*name` uses per file
MAX_DEPTH = 20  # nested mappings/lists; a site file needs 4

MERGE_TAG = "tag:yaml.org,2002:merge"
# Characters that end a line, hide or reorder text, or are not characters at all: refused in every
# string (value or key). Python's `re` `$` matches before a final "\n", so a pattern alone does not
# keep a newline out; this does, for every field, present and future.
_BAD_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}
_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)")


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
            part = printable(str(part))  # a key may hold anything: escape it like a value
            out += f".{part}" if out else part
    return out


def printable(text: str) -> str:
    """A name (a file name, a key) as it may appear in a message: control, format and non-ASCII
    characters escaped (\\n, \\x1b, \\u202e), so a hostile name cannot end a line or move the cursor."""
    if text.isascii() and text.isprintable():
        return text
    out = []
    for c in text:
        if c.isascii() and c.isprintable():
            out.append(c)
        else:
            out.append(c.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)


def bad_character(text: str) -> str | None:
    """The first control/format character of `text` as 'U+000A (a line break)', or None."""
    for c in text:
        if unicodedata.category(c) in _BAD_CATEGORIES:
            name = {"\n": "a line break", "\r": "a carriage return", "\t": "a tab", "\x00": "a NUL byte",
                    "\x1b": "an escape"}.get(c) or unicodedata.name(c, "a control character").lower()
            return f"U+{ord(c):04X} ({name})"
    return None


class _Bad(Exception):
    def __init__(self, line: int, path: str, message: str):
        self.line, self.path, self.message = line, path, message


class _Loader(yaml.SafeLoader):
    """pyyaml's safe loader whose composer refuses deep nesting and many aliases as it reads, before
    any expansion: a composed alias is the same node object, so composing itself stays linear."""

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                line = self.peek_event().start_mark.line + 1
                raise _Bad(line, "", f"more than {MAX_ALIASES} aliases (*name) in one file; write the values out "
                                     "(aliases can expand a few lines into millions of values)")
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _Bad(line, "", f"nested more than {MAX_DEPTH} levels deep; a site file needs 4 "
                                     "(see sites/ for the shape)")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Builder:
    """Composed nodes -> plain data, counting every value it makes (aliases and merges included)."""

    def __init__(self, doc: Document):
        self.doc = doc
        self.count = 0
        self.active: set[int] = set()  # nodes being built: meeting one again is a recursive alias
        self.merging: set[int] = set()  # mappings whose merge keys are being resolved
        self.problems: list[Problem] = []
        self.constructor = yaml.SafeLoader("")

    def _tick(self) -> None:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooBig()

    def _problem(self, line: int, path: tuple, message: str) -> None:
        self.problems.append(Problem(self.doc.file, line, where(path), message))

    def _key(self, node: yaml.Node, path: tuple) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise _Bad(node.start_mark.line + 1, where(path), "a mapping key must be a plain value")
        # A key is its text as written: YAML 1.1 would turn `on:` into True and `010:` into 8.
        key = node.value
        bad = bad_character(key)
        if bad:
            self._problem(node.start_mark.line + 1, path, f"a key contains {bad}; remove it")
            key = printable(key)
        return key

    def pairs(self, node: yaml.MappingNode, path: tuple) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """The mapping's (key, key node, value node), merge keys (`<<`) resolved as YAML defines them:
        the mapping's own keys win, then the merged mappings in order; duplicates among its own
        keys are refused."""
        if id(node) in self.merging:
            raise _Bad(node.start_mark.line + 1, where(path), "a merge key (<<) refers to the mapping it is in; "
                                                              "write the values out")
        self.merging.add(id(node))
        try:
            own: dict[str, tuple[yaml.Node, yaml.Node]] = {}
            merged: dict[str, tuple[yaml.Node, yaml.Node]] = {}
            for key_node, value_node in node.value:
                self._tick()
                if key_node.tag == MERGE_TAG:
                    sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                    for src in sources:
                        if not isinstance(src, yaml.MappingNode):
                            raise _Bad(key_node.start_mark.line + 1, where(path),
                                       "a merge key (<<) takes a mapping or a list of mappings")
                        for k, kn, vn in self.pairs(src, path):
                            merged.setdefault(k, (kn, vn))
                    continue
                key = self._key(key_node, path)
                if key in own:
                    self._problem(key_node.start_mark.line + 1, path + (key,), f"duplicate key {key!r}; remove one of the two")
                    continue
                own[key] = (key_node, value_node)
        finally:
            self.merging.discard(id(node))
        out = [(k, kn, vn) for k, (kn, vn) in own.items()]
        out += [(k, kn, vn) for k, (kn, vn) in merged.items() if k not in own]
        return out

    def build(self, node: yaml.Node, path: tuple, key_line: int | None = None) -> Any:
        self._tick()
        self.doc.lines[path] = (key_line if key_line is not None else node.start_mark.line) + 1
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if id(node) in self.active:
                raise _Bad(node.start_mark.line + 1, where(path), "an alias refers to a value that contains it "
                                                                  "(a recursive alias); write the values out")
            self.active.add(id(node))
            try:
                if isinstance(node, yaml.MappingNode):
                    return {k: self.build(vn, path + (k,), kn.start_mark.line) for k, kn, vn in self.pairs(node, path)}
                return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
            finally:
                self.active.discard(id(node))
        line = node.start_mark.line + 1
        try:
            value = self.constructor.construct_object(node)
        except (ValueError, OverflowError) as e:  # e.g. a date that does not exist: 2024-02-30
            raise _Bad(line, where(path), f"a value YAML cannot read ({type(e).__name__}); quote it or write it plainly")
        if isinstance(value, str):
            bad = bad_character(value)
            if bad:
                self._problem(line, path, f"contains {bad}; remove it (a control character could end a line "
                                          "or hide text in the routers' files)")
        elif isinstance(value, int) and not isinstance(value, bool) and node.style is None \
                and not _DECIMAL.fullmatch(node.value):
            self._problem(line, path, "write the number in plain decimal digits (YAML 1.1 reads 010 as 8, "
                                      "0x10 as 16 and 1:30 as 90)")
        return value


class _TooBig(Exception):
    pass


def read_limited(path: Path, name: str) -> bytes:
    """The bytes of a regular file, at most MAX_FILE_BYTES; never blocks on a FIFO or a device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise WanError([Problem(name, 0, "", f"cannot read the file: {e.strerror}")]) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise WanError([Problem(name, 0, "", "is not a regular file (a directory, FIFO or device); "
                                                 "it was not read; replace it with a YAML file or remove it")])
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise WanError([Problem(name, 0, "", f"cannot read the file: {e.strerror}")]) from None
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:
        raise WanError([Problem(name, 0, "", f"the file is larger than {MAX_FILE_BYTES} bytes; a site file is a few "
                                             "hundred; it was not read")])
    return b"".join(chunks)


def load_yaml(path: Path, display: str | None = None) -> Document:
    """Load one YAML file into a Document; raise WanError (file:line and a fix) if it is bad."""
    name = display or printable(str(path))
    raw = read_limited(path, name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WanError([Problem(name, raw[: e.start].count(b"\n") + 1, "",
                                "the file is not UTF-8 text; save it as UTF-8")]) from None
    doc = Document(name, None)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except _Bad as e:
        raise WanError([Problem(name, e.line, e.path, e.message)]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        what = printable(e.problem or "malformed YAML")
        raise WanError([Problem(name, line, "", f"malformed YAML: {what}; fix the syntax on this line")]) from None
    except yaml.YAMLError:  # pragma: no cover - pyyaml raises marked errors for text input
        raise WanError([Problem(name, 1, "", "malformed YAML; fix the syntax")]) from None
    except RecursionError:  # pragma: no cover - the depth limit comes first
        raise WanError([Problem(name, 1, "", "the document nests too deeply; write it out plainly")]) from None
    finally:
        loader.dispose()
    if node is None:
        raise WanError([Problem(name, 1, "", "the file is empty; see sites/ for an example")])
    builder = _Builder(doc)
    try:
        doc.data = builder.build(node, ())
    except _TooBig:
        raise WanError([Problem(name, 1, "", f"the document expands to more than {MAX_NODES} values (an alias or merge-key bomb?); "
                                             "write it out plainly")]) from None
    except _Bad as e:
        raise WanError(builder.problems + [Problem(name, e.line, e.path, e.message)]) from None
    except yaml.constructor.ConstructorError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 1
        raise WanError([Problem(name, line, "", f"unsupported YAML value: {printable(e.problem or '')}; "
                                                "use plain strings, numbers, lists and mappings")]) from None
    if builder.problems:
        raise WanError(builder.problems)
    return doc
