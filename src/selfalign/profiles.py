"""Apply a parameter profile: write ``params.yaml`` with the keys of ``params/<name>.yaml`` (comments kept).

A profile holds only the keys that differ from the CPU default (``smoke`` for tests, ``paper`` for the paper's
scale on GPUs). ``selfalign profile paper`` writes the committed default (``git show HEAD:params.yaml``) plus
``params/paper.yaml``, validated before writing, and prints every dotted key it changed (``old -> new``);
profiles do not stack. Then ``dvc repro`` (or ``dvc exp run -n paper``); ``git checkout params.yaml`` undoes
it; ``selfalign profile --list`` shows what exists. Without git history the file itself is the base unless its
first line (:data:`MARKER`) says a profile was applied: then ``--base`` is required. Why a file and not ``-S``
flags: docs/profiles.md.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import subprocess
from pathlib import Path
from typing import Any

from selfalign.config import Config

log = logging.getLogger(__name__)

# first line of a params file a profile was written into (names the profile; comments are not params, so DVC
# and the config ignore it)
MARKER = "# selfalign profile: {name} (applied onto the committed params.yaml; `git checkout params.yaml` restores it)"
_MARKER_RE = re.compile(r"^# selfalign profile: (\S+) ")


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


def applied_profile(text: str) -> str | None:
    """The profile whose :data:`MARKER` heads ``text``, or None (a default params file)."""
    m = _MARKER_RE.match(text)
    return m.group(1) if m else None


def committed_text(params_path: Path) -> str | None:
    """``params_path`` as committed at git ``HEAD``, or None (no git, not a repository, not committed)."""
    try:
        proc = subprocess.run(["git", "show", f"HEAD:./{params_path.name}"], cwd=params_path.parent,
                              capture_output=True, text=True, check=False)
    except OSError:  # git not installed
        return None
    return proc.stdout if proc.returncode == 0 else None


def default_base(params_path: Path) -> tuple[str, str]:
    """``(text, where it came from)`` of the default a profile applies onto (see the module docstring)."""
    from selfalign.io import UserError

    committed = committed_text(params_path)
    if committed is not None:
        return committed, f"git HEAD:{params_path.name}"
    current = params_path.read_text(encoding="utf-8") if params_path.exists() else ""
    name = applied_profile(current)
    if name is not None:
        raise UserError(f"{params_path}: profile '{name}' is applied and there is no committed {params_path.name} "
                        "to apply onto (not a git checkout, or the file is not committed); restore the default "
                        "file, or give it with --base FILE")
    if not current:
        raise UserError(f"{params_path}: file not found")
    return current, str(params_path)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys of a params mapping (lists and data mappings as values)."""
    out: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict) and _is_section(f"{prefix}{key}"):  # sections recurse, data mappings are values
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _is_section(dotted: str) -> bool:
    model: Any = Config
    for part in dotted.split("."):
        model = _section_model(model, part)
        if model is None:
            return False
    return True


def changes(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs (missing = None), in ``new``'s key order."""
    a, b = flatten(old), flatten(new)
    keys = list(b) + [k for k in a if k not in b]
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def _load_text(y: Any, text: str, where: Path) -> Any:
    from ruamel.yaml import YAMLError

    from selfalign.io import UserError, yaml_error_message

    try:
        return y.load(text)
    except YAMLError as exc:
        raise UserError(yaml_error_message(exc, where)) from None


def apply_profile(params_path: str | Path, overlay_path: str | Path, out_path: str | Path | None = None, *,
                  base_text: str | None = None, marker: str | None = None) -> list[str]:
    """Write base + overlay to ``out_path`` (default: ``params_path``, in place) after validating it; returns the
    dotted keys the overlay set. The base is ``base_text`` when given (the CLI passes the committed default),
    else ``params_path`` itself; ``marker`` becomes the first line of the written file."""
    from selfalign.config import ConfigError, parse_config
    from selfalign.io import UserError, atomic_write_text, parse_yaml

    params_path, overlay_path = Path(params_path), Path(overlay_path)
    if not overlay_path.exists():
        raise UserError(f"{overlay_path}: profile not found (available: "
                        f"{', '.join(list_profiles(overlay_path.parent)) or 'none'})")
    y = _yaml()
    base = _load_round_trip(y, params_path) if base_text is None else _load_text(y, base_text, params_path)
    overlay = _load_round_trip(y, overlay_path) or {}
    if not isinstance(overlay, dict):
        raise UserError(f"{overlay_path}: a profile is a YAML mapping of params sections")
    changed = merge(base, overlay)
    buf = io.StringIO()
    y.dump(base, buf)
    text = buf.getvalue()
    if marker is not None:
        text = marker + "\n" + (text.split("\n", 1)[1] if applied_profile(text) else text)
    source = f"{params_path} + {overlay_path}"
    parse_config(parse_yaml(text, source, ConfigError), source=source)
    atomic_write_text(out_path or params_path, text)
    return changed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="profile name (a file params/<name>.yaml)")
    parser.add_argument("--dir", default="params", help="directory of profile overlays")
    parser.add_argument("--out", default=None, help="write the merged params here (default: --params, in place)")
    parser.add_argument("--list", action="store_true", help="list the available profiles")
    parser.add_argument("--base", default=None,
                        help="the default params file the profile applies onto (default: --params as committed "
                             "at git HEAD; profiles never stack)")


def main(args: argparse.Namespace, config: Config) -> None:
    from selfalign.io import UserError

    if args.list or not args.name:
        print("\n".join(list_profiles(args.dir)))
        if not args.list:
            raise UserError("give a profile name (see the list above)")
        return
    params_path, overlay_path = Path(args.params), Path(args.dir) / f"{args.name}.yaml"
    if not overlay_path.exists():
        raise UserError(f"{overlay_path}: profile not found (available: "
                        f"{', '.join(list_profiles(overlay_path.parent)) or 'none'})")
    if args.base is not None:
        base_text, where = Path(args.base).read_text(encoding="utf-8"), args.base
    else:
        base_text, where = default_base(params_path)
    target = Path(args.out or args.params)
    before = parse_yaml_or_empty(target)
    apply_profile(params_path, overlay_path, target, base_text=base_text,
                  marker=MARKER.format(name=args.name))
    diff = changes(before, parse_yaml_or_empty(target))
    print(f"{target}: applied profile '{args.name}' onto {where} ({len(diff)} keys changed)")
    for key, old, new in diff:
        print(f"  {key}: {_show(old)} -> {_show(new)}")


def parse_yaml_or_empty(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else {}


def _show(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, default=str)
