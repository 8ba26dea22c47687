"""Walking the config's typed tree (foundation: pydantic only): the section a field holds, a section's
keys, and a validation error explained key by key (driver, and each Tune trial)."""
from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from openclaw.constants import is_secret_key


def explain(error: ValidationError, root: type[BaseModel], source: str, overridden: tuple[str, ...] = ()) -> str:
    """One paragraph naming each bad key of a config validated against `root`, and what it allows."""
    lines = []
    for loc, err in _located(error, root):
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            where = err.get("section")  # the section the key is in (a transform's, by its tag)
            allowed = [f.alias or name for name, f in where.model_fields.items()] if where else []
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            guess = f"did you mean `{'.'.join(loc[:-1] + close)}`? " if close else ""
            where = f"allowed keys there: {', '.join(allowed)}" if allowed else "that is a value, not a section"
            line = f"unknown key `{key}`; {guess}{where}"
        elif err["type"] == "missing" and loc and loc[-1].isdigit():  # a tuple given too few items
            line = f"`{'.'.join(loc[:-1])}` needs more items (item {loc[-1]}, counting from 0, is missing)"
        elif err["type"] == "missing":
            line = f"missing required key `{key}`"
        elif err["type"] == "union":
            line = f"`{key}` {err['msg']}{_given(key, err['input'])}"
        else:
            msg = err["msg"].removeprefix("Value error, ").rstrip(".")
            given = err.get("input")
            shown = "" if isinstance(given, dict) or "`" in msg else _given(key, given)
            line = msg + shown if not loc or msg.startswith(f"`{key}") else f"`{key}`: {msg}{shown}"
        lines.append(line + by_override(key, overridden))
    return f"Invalid config in {source}: " + "; ".join(lines) + "."


def by_override(key: str, overridden: tuple[str, ...]) -> str:
    """" (set by an override)" where an override set `key`, a section above it or a key below it."""
    hit = any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in overridden)
    return " (set by an override)" if hit else ""


def _given(key: str, value: Any) -> str:
    """What a bad value was, to show beside its error; not the value of a secret-looking key."""
    return " (the value is not shown: the key holds a secret)" if is_secret_key(key) else f" (got {value!r})"


def _located(error: ValidationError, root: type[BaseModel]) -> list[tuple[list[str], dict]]:
    """(the config key's parts, the error) for each error, with the branches of a union folded away
    (pydantic names them in the location: `bool`, `literal['auto']`, `CompileConfig`). A value no branch
    took is one error saying what each branch asks for (`scaling.use_gpu` should be a valid boolean; or
    'auto'); where the value went into a section's branch (a mapping was given), that section's own
    errors, under the key."""
    sections = _section_names(root)
    out: list[tuple[list[str], dict]] = []
    unions: dict[tuple[str, ...], list[tuple[list[str], dict, bool]]] = {}
    for err in error.errors():
        raw = [str(p) for p in err["loc"]]
        loc, err = walk(root, raw)[0], {**err, "section": walk(root, raw[:-1])[1]}  # a transform's `op` tag is no key
        at = next((i for i, part in enumerate(loc) if i and _branch(part, sections)), None)
        if at is None:
            out.append((loc, err))
        else:
            unions.setdefault(tuple(loc[:at]), []).append((loc[:at] + loc[at + 1:], err, len(loc) > at + 1))
    for key, errs in unions.items():
        deeper = [(loc, err) for loc, err, deep in errs if deep]
        if deeper:
            out += deeper
            continue
        asks = "; or ".join(e["msg"].removeprefix("Input should be ").split(", ")[0].rstrip(".") for _, e, _ in errs)
        out.append((list(key), {"type": "union", "msg": f"should be {asks}", "input": errs[0][1].get("input")}))
    return out


def _branch(part: str, sections: set[str]) -> bool:
    return part in ("bool", "int", "float", "str", "list", "dict") or part.startswith(
        ("literal[", "function-", "list[", "dict[", "tuple[")) or part in sections


def walk(root: type[BaseModel], loc: list[str]) -> tuple[list[str], type[BaseModel] | None]:
    """`loc` (a validation error's location) as a key the user wrote, and the section at its end (None: a
    value). It goes into list items (`data.transforms.0`) and mapping values (`sweep.space.<key>`), and
    drops the tag pydantic puts in the location of a union told apart by a field (`data.transforms.0.cast`:
    the transform whose `op` is cast)."""
    out: list[str] = []
    ann: Any = root
    i = 0
    while i < len(loc):
        part, model = loc[i], _model(ann)
        named = next((a for a in get_args(ann) if isinstance(a, type) and a.__name__ == part), None)
        if named is not None:  # pydantic's name for a union's branch (`CompileConfig`): kept, for `_located`
            out.append(part)
            ann = named
        elif model is not None:
            field = next((f for name, f in model.model_fields.items() if part in (name, f.alias)), None)
            out.append(part)
            ann = field.annotation if field is not None else None
        elif get_origin(ann) in (list, tuple) and part.isdigit() or get_origin(ann) is dict:
            out.append(part)
            ann = get_args(ann)[-1] if get_args(ann) else None
        elif (member := _tagged(ann, part)) is not None:
            ann = member  # the tag: not part of the key
        else:
            return out + loc[i:], None
        i += 1
    return out, _model(ann)


def _model(annotation: Any) -> type[BaseModel] | None:
    """The section an annotation is: a model, or a model or None; not a union of several models."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is Annotated:
        return _model(get_args(annotation)[0])
    models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if get_origin(annotation) in (Union, type(int | None)) and len(models) == 1 else None


def _tagged(annotation: Any, tag: str) -> type[BaseModel] | None:
    """The member of a union of sections whose literal field is `tag` (a discriminated union's)."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    for member in get_args(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel) and any(
                get_origin(f.annotation) is Literal and tag in get_args(f.annotation)
                for f in member.model_fields.values()):
            return member
    return None



def _section_names(root: type[BaseModel]) -> set[str]:
    """The class names of every section under `root`: how pydantic names a union's section branch."""
    names, todo = set(), [root]
    while todo:
        model = todo.pop()
        for field in model.model_fields.values():
            sub = section_model(field.annotation)
            if sub is not None and sub.__name__ not in names:
                names.add(sub.__name__)
                todo.append(sub)
    return names


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds (also through `X | None`), or None for a plain value."""
    ann = next((a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def booleans_for_numbers(raw: Any, model: type[BaseModel], at: str = "") -> list[str]:
    """The dotted keys of `raw` that give a boolean (or a list holding one) where `model` takes a number
    and no boolean. YAML reads yes/no/on/off/true/false as booleans, which pydantic takes as 1 and 0:
    `max_steps: yes` trained one step, `profile.ranks: true` profiled rank 1."""
    if not isinstance(raw, dict):
        return []
    found = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key not in raw:
            continue
        value, sub = raw[key], section_model(field.annotation)
        if sub is not None and get_origin(field.annotation) not in (dict, list, tuple):
            found += booleans_for_numbers(value, sub, f"{at}{key}.")
        elif get_origin(field.annotation) in (dict, list) and isinstance(value, (dict, list)) and (
                items := _item_sections(field.annotation, value)):  # `data.transforms`, `sweep.space`
            for name_of, item, item_model in items:
                found += booleans_for_numbers(item, item_model, f"{at}{key}.{name_of}.")
        elif any(isinstance(v, bool) for v in (value if isinstance(value, list) else [value])) \
                and _number_not_bool(field.annotation):
            found.append(at + key)
    return found


def _item_sections(annotation: Any, value: list | dict) -> list[tuple[str, dict, type[BaseModel]]]:
    """(its key or index, the item, its section) for each item of a list or mapping of sections, the
    member of a union told apart by a literal field (a transform's `op`) chosen by the item's value."""
    kind = get_args(annotation)[-1] if get_args(annotation) else None
    members = get_args(get_args(kind)[0] if get_origin(kind) is Annotated else kind) or (kind,)
    out = []
    for name, item in (value.items() if isinstance(value, dict) else enumerate(value)):
        model = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel) and isinstance(item, dict)
                      and all(item.get(f.alias or n) in get_args(f.annotation) for n, f in m.model_fields.items()
                              if get_origin(f.annotation) is Literal and f.is_required())), None)
        if model is not None:
            out.append((str(name), item, model))
    return out


def _number_not_bool(annotation: Any) -> bool:
    """Whether a type takes numbers (also in a list, or beside other types) and no boolean."""
    kinds, todo = [], [annotation]
    while todo:
        a = todo.pop()
        if get_origin(a) in (Union, list, tuple) or type(a).__name__ == "UnionType":
            todo += get_args(a)
        else:
            kinds.append(a)
    return bool not in kinds and any(k in (int, float) for k in kinds)


def is_section(root: type[BaseModel], loc: list[str]) -> bool:
    """Whether `loc` names a section of `root` (a model, or a model or a value), not a value that is a
    mapping (`model.kwargs`, `sweep.space` and its dimensions)."""
    model: type[BaseModel] | None = root
    for part in loc:
        field = model.model_fields.get(part) if model else None
        annotation = getattr(field, "annotation", None)
        if get_origin(annotation) in (dict, list, tuple):
            return False
        model = section_model(annotation)
    return model is not None and bool(loc)
