"""Apply a parameter profile: write ``params.yaml`` with the keys of ``params/<name>.yaml`` (comments kept).

A profile holds only the keys that differ from the CPU default (``smoke`` for tests, ``paper`` for the paper's
scale on GPUs). ``selfalign profile paper`` validates the result before writing it; then ``dvc repro`` (or
``dvc exp run -n paper``), and ``git checkout params.yaml`` undoes it. ``selfalign profile --list`` shows what
exists. Why a file and not ``-S`` flags: docs/profiles.md.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path
from typing import Any

from selfalign.config import Config

log = logging.getLogger(__name__)


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()  # round-trip mode: comments, key order and flow style survive
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    # write null as "null" (ruamel's default is an empty value, which reads as a missing entry)
    y.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def list_profiles(profiles_dir: str | Path) -> list[str]:
    return sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))


def _section_model(model: type | None, key: str) -> type | None:
    """The pydantic section class of ``model.key`` (None when the field is plain data, e.g. a dict)."""
    from pydantic import BaseModel

    field = (getattr(model, "model_fields", None) or {}).get(key)
    ann = getattr(field, "annotation", None)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def merge(base: Any, overlay: Any, model: type | None = Config, prefix: str = "") -> list[str]:
    """Deep-merge ``overlay`` into the mapping ``base`` in place; returns the dotted keys it changed.

    Config *sections* merge key by key; any other value -- scalars, lists and data mappings such as
    ``self_align.logit_bias`` -- replaces the base value whole (a profile's logit bias for another
    tokenizer must not keep the default's entries).
    """
    changed = []
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        section = _section_model(model, key)
        if section is not None and isinstance(value, dict) and isinstance(base.get(key), dict):
            changed.extend(merge(base[key], value, section, prefix=f"{dotted}."))
        elif key not in base or base[key] != value:
            base[key] = value
            changed.append(dotted)
    return changed


def _load_round_trip(y: Any, path: Path) -> Any:
    """Load ``path`` with ruamel (comments kept); a syntax error is one line naming file and line."""
    from ruamel.yaml import YAMLError

    from selfalign.io import UserError, yaml_error_message

    try:
        return y.load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except YAMLError as exc:
        raise UserError(yaml_error_message(exc, path)) from None


def apply_profile(params_path: str | Path, overlay_path: str | Path, out_path: str | Path | None = None) -> list[str]:
    """Write ``params_path`` + overlay to ``out_path`` (default: in place) after validating it."""
    from selfalign.config import ConfigError, parse_config
    from selfalign.io import UserError, atomic_write_text, parse_yaml

    params_path, overlay_path = Path(params_path), Path(overlay_path)
    if not overlay_path.exists():
        raise UserError(f"{overlay_path}: profile not found (available: "
                        f"{', '.join(list_profiles(overlay_path.parent)) or 'none'})")
    y = _yaml()
    base = _load_round_trip(y, params_path)
    overlay = _load_round_trip(y, overlay_path) or {}
    if not isinstance(overlay, dict):
        raise UserError(f"{overlay_path}: a profile is a YAML mapping of params sections")
    changed = merge(base, overlay)
    buf = io.StringIO()
    y.dump(base, buf)
    text = buf.getvalue()
    source = f"{params_path} + {overlay_path}"
    parse_config(parse_yaml(text, source, ConfigError), source=source)
    atomic_write_text(out_path or params_path, text)
    return changed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="profile name (a file params/<name>.yaml)")
    parser.add_argument("--dir", default="params", help="directory of profile overlays")
    parser.add_argument("--out", default=None, help="write the merged params here (default: --params, in place)")
    parser.add_argument("--list", action="store_true", help="list the available profiles")


def main(args: argparse.Namespace, config: Config) -> None:
    from selfalign.io import UserError

    if args.list or not args.name:
        print("\n".join(list_profiles(args.dir)))
        if not args.list:
            raise UserError("give a profile name (see the list above)")
        return
    changed = apply_profile(args.params, Path(args.dir) / f"{args.name}.yaml", args.out)
    target = args.out or args.params
    print(f"{target}: applied profile '{args.name}' ({len(changed)} keys changed)")
    for key in changed:
        print(f"  {key}")
