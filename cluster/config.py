"""Typed job configuration: YAML file + ``dotted.key=value`` overrides -> pydantic model.

Every job is ``python -m jobs.<name> [--config FILE.yaml] [dotted.key=value ...]``.
Unknown keys and bad values become one-line :class:`ConfigError` messages that name the key
and what would be valid; ``--help`` lists every key with its default and meaning.
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ops.errors import UserError, first_validation_error

C = TypeVar("C", bound="BaseConfig")


class ConfigError(UserError):
    """A config file or override that does not fit the job's config model."""


class BaseConfig(BaseModel):
    """Base of every job/app config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _unwrap(annotation: Any) -> Any:
    """Return the config-model class inside ``X | None`` style annotations, else the annotation."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            return models[0]
    return annotation


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def iter_fields(model: type[BaseModel], prefix: str = "",
                instance: BaseModel | None = None) -> typing.Iterator[tuple[str, Any, Any, str]]:
    """Yield ``(dotted_key, annotation, default, description)`` for every leaf key of ``model``.

    A section's defaults are those of the instance its parent builds (a job may embed a shared
    section such as ``eval`` with defaults of its own), else the section class's.
    """
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        default = getattr(instance, name) if instance is not None else field.get_default(call_default_factory=True)
        sub = _unwrap(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from iter_fields(sub, key + ".", default if isinstance(default, BaseModel) else None)
        else:
            yield key, field.annotation, default, field.description or ""


def valid_keys(model: type[BaseModel]) -> list[str]:
    return [k for k, *_ in iter_fields(model)]


def format_help(model: type[BaseModel], prog: str, description: str) -> str:
    """The ``--help`` text: usage, description and one line per key."""
    lines = [
        f"usage: python -m {prog} [--config FILE.yaml] [key=value ...]",
        "",
        description.strip(),
        "",
        "Options (dotted keys; values are YAML scalars or lists, e.g. lora.r=8 targets=[q_proj,v_proj]):",
    ]
    rows = [(k, _type_name(a), yaml.safe_dump(d, default_flow_style=True).strip().removesuffix("\n..."), desc)
            for k, a, d, desc in iter_fields(model)]
    width = max(len(k) for k, *_ in rows)
    for key, typ, default, desc in rows:
        lines.append(f"  {key:<{width}}  {desc} [{typ}; default: {default}]")
    lines += ["", "  --config FILE.yaml  load keys from a YAML file first; key=value overrides win",
              "  -h, --help          show this message and exit"]
    return "\n".join(lines)


def format_markdown(model: type[BaseModel]) -> str:
    """The config-key table of a docs page (``docs/<job>.md``): key, type, default, meaning."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, annotation, default, desc in iter_fields(model):
        shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip().removesuffix("\n...")
        rows.append(f"| `{key}` | {cell(_type_name(annotation))} | `{shown}` | {cell(desc)} |")
    return "\n".join(rows)


def _set_dotted(tree: dict, key: str, value: Any, model: type[BaseModel]) -> None:
    parts = key.split(".")
    current_model: Any = model
    node = tree
    for i, part in enumerate(parts):
        fields = current_model.model_fields if isinstance(current_model, type) and issubclass(
            current_model, BaseModel) else {}
        if part not in fields:
            prefix = ".".join(parts[:i])
            _raise_unknown(key, model, prefix)
        is_last = i == len(parts) - 1
        if is_last:
            node[part] = value
        else:
            current_model = _unwrap(fields[part].annotation)
            if not (isinstance(current_model, type) and issubclass(current_model, BaseModel)):
                raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is a value, not a section; "
                                  f"cannot set '{key}'")
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


def _raise_unknown(key: str, model: type[BaseModel], prefix: str = "") -> typing.NoReturn:
    keys = valid_keys(model)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    scope = [k for k in keys if k.startswith(prefix + ".")] if prefix else keys
    raise ConfigError(f"unknown config key '{key}'{hint}; valid keys: {', '.join(scope)}")


def _check_unknown(tree: dict, model: type[BaseModel], root: type[BaseModel], prefix: str = "") -> None:
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if k not in model.model_fields:
            _raise_unknown(key, root, prefix.rstrip("."))
        sub = _unwrap(model.model_fields[k].annotation)
        if isinstance(v, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            _check_unknown(v, sub, root, key + ".")


def format_validation_error(err: ValidationError) -> str:
    """One line for a config that failed validation: the key, what is wrong and the value given."""
    loc, msg, first = first_validation_error(err.errors())
    loc = loc or "config"
    got = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{loc}'"
    shown = repr(got) if not isinstance(got, dict) else "a section"
    return f"bad value for '{loc}': {msg} (got {shown})"


def parse_value(text: str) -> Any:
    """Parse an override's value as YAML, so ``8`` is an int and ``[a,b]`` a list."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def load_config(model: type[C], config_file: str | None = None, overrides: typing.Sequence[str] = ()) -> C:
    """Build a validated config from an optional YAML file and ``key=value`` overrides.

    Raises:
        ConfigError: a missing/invalid file, an unknown key or a bad value (one line).
    """
    tree: dict = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file '{config_file}' does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{config_file}' is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{config_file}' must hold a mapping of keys, got {type(loaded).__name__}")
        _check_unknown(loaded, model, model)
        tree = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got '{item}' (see --help for the keys)")
        key, _, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        _set_dotted(tree, key, parse_value(raw), model)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def parse_args(model: type[C], argv: typing.Sequence[str] | None, prog: str, description: str) -> C:
    """Parse a job's command line. Prints ``--help`` and exits 0 when asked."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(format_help(model, prog, description))
        raise SystemExit(0)
    config_file = None
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file path")
            config_file = args[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return load_config(model, config_file, rest)


# Config keys whose values never reach a printed or saved config (e.g. the pipeline's serve.app.api_key).
SECRET_KEYS = ("api_key", "password", "secret", "token")
REDACTED = "<redacted>"


def redact(tree: Any) -> Any:
    """``tree`` with the value of every key named like a secret (:data:`SECRET_KEYS`, or ending in
    ``_<one of them>``) replaced by ``<redacted>``, at any depth."""
    if isinstance(tree, dict):
        return {k: REDACTED if _is_secret(k) and v is not None else redact(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tree


def _is_secret(key: Any) -> bool:
    return isinstance(key, str) and any(key == s or key.endswith("_" + s) for s in SECRET_KEYS)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what is printed at start and saved beside artifacts), secrets redacted."""
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)


def save_config(cfg: BaseModel, directory: str | Path, filename: str = "config.yaml") -> Path:
    path = Path(directory) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))
    return path


def storage_field() -> Any:
    """The ``storage`` key every job and the Serve app share."""
    from pydantic import Field

    from cluster.storage import default_storage

    return Field(default_factory=default_storage, description="artifact root: local path or URI (s3://bucket/prefix, "
                 "gs://...; see docs/cluster.md); default $RAYLM_STORAGE, else ./artifacts")
