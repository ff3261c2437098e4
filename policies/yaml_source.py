"""YAML read into a pydantic model, with errors an operator can act on: the file, the line, the key
path, what is wrong and what is allowed instead (with a "did you mean" for a misspelt key).

Shared by policy files (policies/loader.py) and the gateway config (gateway/config.py). Lines come
from the YAML node tree (yaml.compose keeps each node's position), so pydantic's error locations and
the callers' own cross-field checks both point at the line to fix.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

Loc = tuple[str | int, ...]
Problem = tuple[str, int | None, str, str]  # (file, line, key path, message)


class YamlSyntaxError(ValueError):
    """The text is not one YAML document. `line` and `column` are 1-based (None where YAML gives none);
    `detail` says what is wrong without quoting the line (a config's line may hold a secret)."""

    def __init__(self, line: int | None, column: int | None, detail: str):
        self.line, self.column, self.detail = line, column, detail
        super().__init__(detail)


def compose(text: str) -> tuple[yaml.Node | None, Any, list[tuple[Loc, int, str]]]:
    """The document's node tree, its data and its duplicate keys (loc, line, message). Raises
    YamlSyntaxError. Duplicates are found before the data is constructed: constructing flattens merge
    keys (`<<: *anchor`) into the node tree, which made a key overriding a merged one look repeated."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # refuses a control character (a NUL) already
        root = loader.get_single_node()
        duplicates = duplicate_keys(root) if root is not None else []
        data = loader.construct_document(root) if root is not None else None
    except yaml.reader.ReaderError as exc:
        raise YamlSyntaxError(None, None, f"character #x{exc.character:04x} at offset {exc.position}: "
                                          f"{exc.reason}") from None
    except (ValueError, RecursionError) as exc:
        # An integer of over 4300 digits (Python's int limit), lists nested past Python's stack: they
        # escaped as tracebacks, and killed the gateway's policy watcher (no reload after)
        what = "nested too deep" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
        raise YamlSyntaxError(None, None, what) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        detail = " ".join(str(part) for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part)
        if "'\\t'" in detail:
            detail += " (a tab: YAML takes spaces only)"
        raise YamlSyntaxError(mark.line + 1 if mark else None, mark.column + 1 if mark else None,
                              detail or type(exc).__name__) from None
    finally:
        if loader is not None:
            loader.dispose()
    return root, data, duplicates


def validation_problems(exc: ValidationError, root: yaml.Node, model: type[BaseModel], source: str,
                        *, quote_text: bool = True) -> list[Problem]:
    """Pydantic's errors as problems: each on its line, its message reworded for an operator.
    `quote_text` False: a wrong text value is not repeated (a config's may be a secret: a raw API key
    where its sha256 goes)."""
    problems: list[Problem] = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        if loc and loc[-1] == "[key]" and (key := _unquoted_key(root, loc[:-2], error.get("input"))) is not None:
            problems.append((source, key.start_mark.line + 1, dotted(loc[:-2] + (key.value,)),
                             f"YAML reads the key `{key.value}` as a {_YAML_TYPES.get(key.tag, 'value')}, not a name: "
                             f'quote it ("{key.value}":)'))
            continue
        problems.append((source, line_of(root, loc), dotted(loc), explain(error, model, quote_text=quote_text)))
    return problems


_YAML_TYPES = {"tag:yaml.org,2002:bool": "boolean", "tag:yaml.org,2002:int": "number",
               "tag:yaml.org,2002:float": "number", "tag:yaml.org,2002:null": "null"}


def _unquoted_key(root: yaml.Node, loc: Loc, value: Any) -> yaml.ScalarNode | None:
    """The key node of the mapping at `loc` that YAML read as `value`, not as text (`on:` and `yes:` are
    booleans, `2024:` a number): pydantic's location holds the value, which the file does not."""
    node: yaml.Node | None = root
    for part in loc:
        found = _child(node, part)
        node = found[1] if found else None
        if node is None:
            return None
    if not isinstance(node, yaml.MappingNode):
        return None
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag in _YAML_TYPES and \
                yaml.safe_load(key.value) == value and type(yaml.safe_load(key.value)) is type(value):
            return key
    return None


def format_problem(source: str, line: int | None, path: str, message: str) -> str:
    where = f"{source}:{line}" if line else source
    return f"{where}: {path}: {message}" if path else f"{where}: {message}"


def line_of(root: yaml.Node, loc: Loc) -> int:
    """Line of the deepest key on `loc` that exists (a missing key points at its parent).

    A mapping entry is reported on its key's line, where an operator looks for it, not on its value's
    (a nested mapping starts on the next line).
    """
    node, line = root, root.start_mark.line + 1
    for part in loc:
        found = _child(node, part)
        if found is None:
            break
        line, node = found
    return line


def _child(node: yaml.Node, part: str | int) -> tuple[int, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key.start_mark.line + 1, value
        return None
    if isinstance(node, yaml.SequenceNode):
        if isinstance(part, int) and 0 <= part < len(node.value):
            item = node.value[part]
            return item.start_mark.line + 1, item
        for item in node.value:  # a list of names addressed by name (route candidates given as a list)
            if isinstance(item, yaml.ScalarNode) and item.value == str(part):
                return item.start_mark.line + 1, item
    return None


def duplicate_keys(node: yaml.Node, loc: Loc = ()) -> list[tuple[Loc, int, str]]:
    """YAML quietly keeps the last of two equal keys; in a file an operator edits that hides a mistake,
    so it is an error."""
    found: list[tuple[Loc, int, str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key)
            if name in seen:
                found.append((loc + (name,), key.start_mark.line + 1, f"key `{name}` appears twice in this mapping"))
            seen.add(name)
            found += duplicate_keys(value, loc + (name,))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found += duplicate_keys(item, loc + (index,))
    return found


def dotted(loc: Loc) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else (f".{part}" if i else str(part)) for i, part in enumerate(loc))


def explain(error: dict, model: type[BaseModel], *, quote_text: bool = True) -> str:
    """Pydantic's message, reworded where it would not tell an operator what to write instead."""
    kind, loc = error["type"], tuple(error["loc"])
    if kind == "extra_forbidden":
        allowed = allowed_keys(model, loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f"did you mean `{guess[0]}`? " if guess else ""
        expected = f"; {hint}expected one of: {', '.join(allowed)}" if allowed else ""
        return f"unknown key `{loc[-1]}`{expected}"
    if kind == "missing":
        return f"missing required key `{loc[-1]}`"
    if kind == "value_error":  # a validator's own sentence
        return error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    quoted = not isinstance(got, (dict, list)) and (quote_text or not isinstance(got, str))
    shown = repr(got) if quoted else f"a {type(got).__name__}"
    return f"{error['msg']} (got {shown})"


def allowed_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys the mapping at `loc` takes, where it is a model ([] where it is not)."""
    current: object = model
    for part in loc:
        current = _step(current, part)
        if current is None:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _step(annotation: object, part: str | int) -> object:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return _unwrap(field.annotation) if field else None
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return _unwrap(typing.get_args(annotation)[0])
    if origin is dict:
        return _unwrap(typing.get_args(annotation)[1])
    return None


def _unwrap(annotation: object) -> object:
    """Strip Annotated[...] and Optional[...] down to the model, list or dict inside."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            annotation = options[0] if len(options) == 1 else annotation
            if len(options) != 1:
                return annotation
        else:
            return annotation
