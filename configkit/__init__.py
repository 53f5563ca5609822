"""Strict settings, one source of truth: the pydantic models in gateway/settings.py and engine/settings.py.

Everything that describes a setting is derived from those models here: the unknown-key check of a YAML file
(with "did you mean" hints), the unknown-variable check of ``GATEWAY_*`` / ``ENGINE_*``, the ``--help``
reference (variable, type, default, meaning), ``config check``'s effective configuration with the origin of
each value, and the chart's JSON schema for the embedded gateway config (scripts/gen_chart_schema.py).

A setting's one-line meaning is its ``Field(description=...)``, else the ``#`` comment block right above it
in the class body (so the settings files stay readable as they are).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import json
import re
import textwrap
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


class ConfigError(ValueError):
    """A configuration problem, as one line naming the key and where it came from."""


class StrictModel(BaseModel):
    """Base of every settings section: an unknown key is an error, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- types


def _unwrap(annotation: Any) -> list[Any]:
    """The arms of an Optional/Union annotation (one element otherwise), ``None`` removed."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    return [annotation]


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _model_arm(annotation: Any) -> type[BaseModel] | None:
    for a in _unwrap(annotation):
        if _is_model(a):
            return a
    return None


def _container_arm(annotation: Any, kind: type) -> Any | None:
    """The item (list) or value (dict) type of a ``list[X]`` / ``dict[str, X]`` arm, if there is one."""
    for a in _unwrap(annotation):
        if typing.get_origin(a) is kind:
            args = typing.get_args(a)
            if args:
                return args[-1]
            return Any
    return None


def type_name(annotation: Any) -> str:
    """Short human type: ``int``, ``float?`` (optional), ``memory|redis``, ``list[str]``, ``ModelConfig``."""
    arms = _unwrap(annotation)
    optional = len(arms) < len(typing.get_args(annotation) or [annotation]) and typing.get_origin(
        annotation
    ) in (
        typing.Union,
        types.UnionType,
    )

    def one(t: Any) -> str:
        o = typing.get_origin(t)
        if o is Literal:
            return "|".join(str(v) for v in typing.get_args(t))
        if o in (list, dict, tuple, set):
            return f"{o.__name__}[{', '.join(one(a) for a in typing.get_args(t))}]"
        if t is Any:
            return "any"
        return getattr(t, "__name__", str(t))

    s = " | ".join(one(a) for a in arms)
    return s + ("?" if optional else "")


# ------------------------------------------------------------------------------------------ field docs


@cache
def _comments_above(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the ``#`` lines right above each annotated attribute in ``cls``'s body."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    out: dict[str, str] = {}
    try:
        tree = ast.parse(src)
    except SyntaxError:  # pragma: no cover
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    # A comment block documents the attribute below it and the attributes that directly follow that one
    # (no blank line, no comment between): a group such as ``breaker_failures`` / ``breaker_open``.
    current, prev_end = "", -10
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            i = node.lineno - 2
            block: list[str] = []
            while i >= 0 and lines[i].strip().startswith("#"):
                block.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            tail = lines[node.end_lineno - 1] if node.end_lineno else ""
            if block:
                current = " ".join(block)
            elif node.lineno - 1 != prev_end:
                current = ""
            if "  # " in tail and not block:
                out[node.target.id] = tail.split("  # ", 1)[1].strip()
                current = ""
            elif current:
                out[node.target.id] = current
            prev_end = node.end_lineno or node.lineno
        else:
            current, prev_end = "", -10
    return out


def field_doc(cls: type[BaseModel], name: str) -> str:
    """The meaning of a field: its description, else the comment above it (inherited fields too)."""
    info = cls.model_fields[name]
    if info.description:
        return info.description
    for klass in cls.__mro__:
        if _is_model(klass) and name in getattr(klass, "__annotations__", {}):
            doc = _comments_above(klass).get(name)
            if doc:
                return doc
    return ""


def first_sentence(text: str, limit: int = 400) -> str:
    """The meaning as shown in help and schemas (the whole comment, up to ``limit`` characters)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------ key names


def yaml_keys(cls: type[BaseModel], *, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """Every key a YAML mapping for ``cls`` may use -> the field it sets (names and validation aliases)."""
    keys: dict[str, str] = {}
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        keys[name] = name
        va = info.validation_alias
        if isinstance(va, AliasChoices):
            for c in va.choices:
                if isinstance(c, str):
                    keys[c] = name
        elif isinstance(va, str) and not va.isupper():
            keys[va] = name
        if isinstance(info.alias, str):
            keys[info.alias] = name
    return keys


def did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    cands = list(candidates)
    low = {c.lower(): c for c in cands}
    m = difflib.get_close_matches(word.lower(), list(low), n=1, cutoff=0.6)
    if m:
        return f" (did you mean '{low[m[0]]}'?)"
    return f" (valid keys: {', '.join(sorted(cands))})" if len(cands) <= 12 else ""


def _fmt_path(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def check_unknown_keys(
    cls: type[BaseModel],
    data: Any,
    origin: str,
    path: tuple[Any, ...] = (),
    skip: frozenset[str] = frozenset(),
) -> None:
    """Raise :class:`ConfigError` on the first key of ``data`` (at any depth) that ``cls`` does not define."""
    if not isinstance(data, Mapping):
        return
    keys = yaml_keys(cls, skip=skip)
    for k, v in data.items():
        if not isinstance(k, str) or k not in keys:
            where = _fmt_path((*path, k))
            raise ConfigError(f"{origin}: unknown key '{where}'{did_you_mean(str(k), keys)}")
        _check_value(cls.model_fields[keys[k]].annotation, v, origin, (*path, k))


def _check_value(annotation: Any, v: Any, origin: str, path: tuple[Any, ...]) -> None:
    if isinstance(v, Mapping):
        model = _model_arm(annotation)
        if model is not None:
            check_unknown_keys(model, v, origin, path)
            return
        inner = _container_arm(annotation, dict)
        if inner is not None:
            for k, item in v.items():
                _check_value(inner, item, origin, (*path, k))
    elif isinstance(v, list):
        inner = _container_arm(annotation, list)
        if inner is not None:
            for i, item in enumerate(v):
                _check_value(inner, item, origin, (*path, i))


# ------------------------------------------------------------------------------------ environment names


@dataclass(frozen=True)
class Setting:
    """One row of the reference: a YAML path, its environment variable (None: YAML only), type, default."""

    path: str
    env: str | None
    type: str
    default: str
    doc: str
    secret: bool


# A setting whose name has one of these as a whole word (api_key, upstream_api_key, password, ...) is a secret;
# tokens_per_minute, max_token_bytes or api_keys_file are not.
_SECRET_NAME = re.compile(r"(^|_)(api_key|password|passwd|secret|secret_key|token|credentials?)($|_)")


def is_secret(name: str) -> bool:
    n = name.lower()
    return bool(_SECRET_NAME.search(n)) and not n.endswith(
        ("_bytes", "_claim", "_cache_size", "_file", "_size")
    )


def _default_text(info: FieldInfo) -> str:
    if info.default is not PydanticUndefined:
        d = info.default
    elif info.default_factory is not None:
        try:
            d = info.default_factory()  # type: ignore[call-arg]
        except TypeError:  # pragma: no cover
            return "?"
    else:
        return "(required)"
    if isinstance(d, BaseModel):
        return "(section)"
    if d is None:
        return "unset"
    if isinstance(d, str):
        return d if d else '""'
    return json.dumps(d) if isinstance(d, (list, dict, bool)) else str(d)


def settings_reference(
    cls: type[BaseModel],
    env_prefix: str | None,
    delimiter: str | None = "__",
    *,
    path: str = "",
    skip: frozenset[str] = frozenset(),
) -> list[Setting]:
    """Every setting of ``cls``: nested sections are expanded; items of lists and maps appear as
    ``models[].name`` / ``principals.<name>.rpm`` (YAML only, no variable)."""
    rows: list[Setting] = []
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        key = f"{path}.{name}" if path else name
        env = None
        if env_prefix is not None:
            va = info.validation_alias
            env = va if isinstance(va, str) and va.isupper() else f"{env_prefix}{name.upper()}"
        ann = info.annotation
        model = _model_arm(ann)
        doc = first_sentence(field_doc(cls, name) or (model.__doc__ or "" if model else "").strip())
        rows.append(Setting(key, env, type_name(ann), _default_text(info), doc, is_secret(name)))
        sub_prefix = f"{env}{delimiter}" if env and delimiter else None
        if model is not None:
            rows += settings_reference(model, sub_prefix, delimiter, path=key)
            continue
        for kind, suffix in ((list, "[]"), (dict, ".<name>")):
            inner = _container_arm(ann, kind)
            inner_model = _model_arm(inner) if inner is not None else None
            if inner_model is not None:
                rows += settings_reference(inner_model, None, None, path=key + suffix)
    return rows


def _env_tree(cls: type[BaseModel], parts: list[str]) -> tuple[bool, list[str], int]:
    """Whether the lower-cased variable-name parts name a setting of ``cls``; if not, the valid names at the
    depth where it went wrong and that depth."""
    names = {n.lower(): n for n in cls.model_fields}
    head = parts[0]
    if head not in names:
        return False, sorted(names), 0
    if len(parts) == 1:
        return True, [], 0
    ann = cls.model_fields[names[head]].annotation
    model = _model_arm(ann)
    if model is not None:
        ok, valid, depth = _env_tree(model, parts[1:])
        return ok, valid, depth + 1
    if _container_arm(ann, dict) is not None:
        return True, [], 0  # arbitrary map keys (principal names, ...)
    return False, [], 1


def check_environment(
    cls: type[BaseModel],
    environ: Mapping[str, str],
    prefix: str,
    delimiter: str | None = "__",
    *,
    extra_names: frozenset[str] = frozenset(),
) -> None:
    """Raise :class:`ConfigError` for a variable that starts with ``prefix`` but names no setting."""
    for var in sorted(environ):
        if not var.upper().startswith(prefix) or var.upper() in extra_names:
            continue
        rest = var[len(prefix) :].lower()
        parts = rest.split(delimiter.lower()) if delimiter else [rest]
        ok, valid, depth = _env_tree(cls, parts)
        if ok:
            continue
        if valid:
            close = difflib.get_close_matches(parts[depth], valid, n=1, cutoff=0.6)
            fixed = [*parts[:depth], close[0], *parts[depth + 1 :]] if close else []
            hint = (
                f" (did you mean '{prefix}{(delimiter or '').join(p.upper() for p in fixed)}'?)"
                if close
                else ""
            )
        else:
            hint = f" ({prefix}{(delimiter or '').join(p.upper() for p in parts[:depth])} is not a section)"
        raise ConfigError(f"environment: unknown variable {var}: no setting has this name{hint}")


def env_origins(
    cls: type[BaseModel], environ: Mapping[str, str], prefix: str, delimiter: str | None = "__"
) -> dict[tuple[str, ...], str]:
    """``{field path: variable}`` for the variables of ``environ`` that set a setting of ``cls``."""
    out: dict[tuple[str, ...], str] = {}
    for var in environ:
        if not var.upper().startswith(prefix):
            continue
        rest = var[len(prefix) :].lower()
        parts = rest.split(delimiter.lower()) if delimiter else [rest]
        out[tuple(parts)] = var
    return out


# ---------------------------------------------------------------------------------- effective config


_URL_USERINFO = re.compile(r"^([a-z][a-z0-9+.\-]*://)([^@/]*)@", re.I)


def mask(name: str, value: Any) -> Any:
    """A value fit to print: secrets as ``***``, passwords in URLs removed."""
    if value is None:
        return None
    if is_secret(name):
        return "***"
    if isinstance(value, str):
        return _URL_USERINFO.sub(lambda m: f"{m.group(1)}***@", value)
    return value


def effective(
    settings: BaseModel,
    file_data: Mapping[str, Any] | None,
    file_origin: str,
    env: Mapping[tuple[str, ...], str],
    init: Mapping[str, Any] | None = None,
) -> list[tuple[str, Any, str]]:
    """``(path, printable value, origin)`` for every leaf value of ``settings``."""
    rows: list[tuple[str, Any, str]] = []

    def origin_of(path: tuple[Any, ...]) -> str:
        low = tuple(str(p).lower() for p in path)
        for n in range(len(low), 0, -1):
            if low[:n] in env:
                return f"env {env[low[:n]]}"
        if init and path and path[0] in init:
            return "command line"
        node: Any = file_data or {}
        for p in path:
            if isinstance(node, Mapping) and p in node:
                node = node[p]
            elif isinstance(node, Mapping) and isinstance(p, str):
                # a key given through an alias (rpm for requests_per_minute)
                hit = [k for k in node if isinstance(k, str) and _alias_of(k) == p]
                if not hit:
                    return "default"
                node = node[hit[0]]
            elif isinstance(node, list) and isinstance(p, int) and p < len(node):
                node = node[p]
            else:
                return "default"
        return f"file {file_origin}"

    def walk(obj: Any, path: tuple[Any, ...], secret: bool) -> None:
        if isinstance(obj, BaseModel):
            if not type(obj).model_fields:
                rows.append((_fmt_path(path), "{}", origin_of(path)))
            for name in type(obj).model_fields:
                walk(getattr(obj, name), (*path, name), is_secret(name))
            return
        if isinstance(obj, list) and obj and any(isinstance(x, (BaseModel, dict, list)) for x in obj):
            for i, x in enumerate(obj):
                walk(x, (*path, i), secret)
            return
        if isinstance(obj, dict) and obj:
            for k, x in obj.items():
                walk(x, (*path, k), secret or is_secret(str(k)))
            return
        name = next((str(p) for p in reversed(path) if isinstance(p, str)), "")
        value = "***" if (secret and obj not in (None, "", [], {})) else mask(name, obj)
        rows.append((_fmt_path(path), value, origin_of(path)))

    walk(settings, (), False)
    return rows


_ALIASES: dict[str, str] = {}


def _alias_of(key: str) -> str | None:
    return _ALIASES.get(key)


def register_aliases(*models: type[BaseModel]) -> None:
    """Let :func:`effective` find values given through an alias (``rpm`` for ``requests_per_minute``)."""
    for m in models:
        for k, name in yaml_keys(m).items():
            if k != name:
                _ALIASES[k] = name


def render_effective(rows: list[tuple[str, Any, str]]) -> str:
    width = min(60, max((len(p) + len(_show(v)) + 3 for p, v, _ in rows), default=0))
    out = []
    for p, v, o in rows:
        left = f"{p} = {_show(v)}"
        out.append(f"{left:<{width}}  # {o}")
    return "\n".join(out)


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def one_line(e: ValidationError, origin: str) -> str:
    """A pydantic error as one line: ``origin: path: message (got value)``; further errors counted."""
    errs = e.errors()
    first = errs[0]
    loc = _fmt_path(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid")
    got = first.get("input")
    got_s = ""
    if not isinstance(got, (dict, list)) and first.get("type") != "missing":
        name = next((str(p) for p in reversed(first.get("loc", ())) if isinstance(p, str)), "")
        got_s = f" (got {mask(name, got)!r})"
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{origin}: {loc + ': ' if loc else ''}{msg}{got_s}{more}"


# ---------------------------------------------------------------------------------------- help text


def render_reference(rows: list[Setting], *, width: int = 110, yaml: bool = True) -> str:
    """The settings reference for ``--help``: one entry per setting, with its meaning on the next line."""
    out: list[str] = []
    for r in rows:
        name = r.env or f"(YAML) {r.path}"
        head = f"  {name}  [{r.type}]  default: {r.default}"
        if r.env and yaml:
            head += f"   YAML: {r.path}"
        out.append(head)
        if r.doc:
            out += textwrap.wrap(r.doc, width=width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- JSON schema


def json_schema(cls: type[BaseModel], *, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A draft-07 schema of what a YAML mapping for ``cls`` may hold: closed objects (unknown keys fail),
    types, enums and numeric bounds, a description per property. Self-contained (no $ref)."""
    props: dict[str, Any] = {}
    for key, name in yaml_keys(cls, skip=skip).items():
        info = cls.model_fields[name]
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        # A field whose validator accepts more than its type says (one string for a list) names its input
        # schema under json_schema_extra["yaml"].
        s = dict(extra["yaml"]) if "yaml" in extra else _type_schema(info.annotation)  # type: ignore[arg-type]
        for meta in info.metadata:
            for attr, kw in (
                ("ge", "minimum"),
                ("le", "maximum"),
                ("gt", "exclusiveMinimum"),
                ("lt", "exclusiveMaximum"),
            ):
                v = getattr(meta, attr, None)
                if v is not None and "type" in s:
                    s[kw] = v
        doc = first_sentence(field_doc(cls, name))
        if doc:
            s["description"] = doc
        props[key] = s
    return {"type": "object", "properties": props, "additionalProperties": False}


def _type_schema(annotation: Any) -> dict[str, Any]:
    arms = _unwrap(annotation)
    nullable = len(arms) < len(typing.get_args(annotation)) and typing.get_origin(annotation) in (
        typing.Union,
        types.UnionType,
    )
    schemas = [_arm_schema(a) for a in arms]
    s = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if nullable:
        if "type" in s and isinstance(s["type"], str) and set(s) <= {"type"}:
            s = {"type": [s["type"], "null"]}
        elif "enum" in s:
            s = {"enum": [*s["enum"], None]}
        else:
            s = {"anyOf": [s, {"type": "null"}]}
    return s


def _arm_schema(t: Any) -> dict[str, Any]:
    if _is_model(t):
        return json_schema(t)
    o = typing.get_origin(t)
    if o is Literal:
        return {"enum": list(typing.get_args(t))}
    if o is list:
        args = typing.get_args(t)
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if o is dict:
        args = typing.get_args(t)
        return (
            {"type": "object", "additionalProperties": _type_schema(args[1])} if args else {"type": "object"}
        )
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if t in simple:
        return {"type": simple[t]}
    return {}


def iter_models(cls: type[BaseModel]) -> Iterator[type[BaseModel]]:
    """``cls`` and every model nested in it (each once)."""
    seen: set[type] = set()
    todo = [cls]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        yield m
        for info in m.model_fields.values():
            for arm in _unwrap(info.annotation):
                for t in (arm, _container_arm(arm, list), _container_arm(arm, dict)):
                    if t is not None and _model_arm(t) is not None:
                        todo.append(_model_arm(t))  # type: ignore[arg-type]
