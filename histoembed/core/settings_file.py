"""Settings as a file: reading ``histoembed.toml`` (or ``--config``) into the typed settings of ``config.py``, and
writing them back as TOML (``histoembed config``). Everything the stages read is in ``config.py``; this module is
what the command line uses to fill it."""

from __future__ import annotations

import codecs
import json
import os
import tomllib
from pathlib import Path

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from histoembed.core.config import Settings, _Settings
from histoembed.core.errors import UserError


CONFIG_FILE = "histoembed.toml"


def load_settings(path: Path | None = None) -> Settings:
    """Read ``histoembed.toml`` (the given path, else the current folder's if present)."""
    if path is None:
        path = Path(CONFIG_FILE)
        if path.is_symlink() and not path.exists():  # ignoring it would run with defaults unseen
            raise UserError(f"this settings file is a link to {os.readlink(path)}, which does not exist", path=path,
                            hint="point the link at an existing file, or remove it to run with the defaults")
        if not path.exists():
            return Settings()
    try:
        raw = tomllib.loads(read_text(Path(path)))
    except FileNotFoundError:
        dangling = Path(path).is_symlink()
        raise UserError("settings file not found" + (" (a link to a missing file)" if dangling else ""), path=path,
                        hint="pass an existing --config file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"not valid TOML: {e}", path=path) from None
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        lines = [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise UserError("invalid settings: " + "; ".join(lines), path=path) from None


def read_text(path: Path) -> str:
    """A settings file's text: UTF-8, or UTF-16 / UTF-8 with a byte-order mark.

    PowerShell's ``histoembed config > histoembed.toml`` writes UTF-16 with a BOM, and
    ``Out-File -Encoding utf8`` UTF-8 with a BOM; TOML itself is UTF-8 without one.
    """
    data, skip = path.read_bytes(), 0
    for bom, codec in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                       (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            data, skip = data[len(bom):], len(bom)
            break
    else:
        codec = "utf-8"
    try:
        return data.decode(codec)
    except UnicodeDecodeError as e:
        raise UserError(f"not a {codec.upper()} text file (undecodable byte at offset {e.start + skip})", path=path,
                        hint="save it as UTF-8, e.g. `histoembed config | Out-File -Encoding utf8 "
                             f"{path.name}` in PowerShell, then run the command again") from None


def field_at(path: str) -> tuple[FieldInfo, type[_Settings]]:
    """The field of a dotted settings path, e.g. ``fit.mlp.hidden``, and the settings class holding it."""
    model: type[_Settings] = Settings
    *tables, name = path.split(".")
    for t in tables:
        model = model.model_fields[t].annotation
    return model.model_fields[name], model


def toml_value(value) -> str:
    """One value in TOML spelling (settings hold only bools, numbers, strings and tuples of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML spelling for {type(value).__name__}")


def to_toml(settings: dict, prefix: str = "") -> str:
    """Settings (as ``model_dump()`` gives them) as TOML tables, sub-tables after their keys.

    TOML has no null: a setting that is None (e.g. "decide for me") is left out, which reads back as None.
    """
    keys = [f"{k} = {toml_value(v)}" for k, v in settings.items() if not isinstance(v, dict) and v is not None]
    out = ([f"[{prefix}]"] if prefix and keys else []) + keys
    for k, v in settings.items():
        if isinstance(v, dict):
            sub = to_toml(v, f"{prefix}.{k}" if prefix else k)
            out += ([""] if out else []) + [sub]
    return "\n".join(out)
