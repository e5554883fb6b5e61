"""dvc.yaml declares the code each stage runs: a change to a module re-runs exactly the stages that import it.

For every stage whose command is ``bin/selfalign <stage>``, the import closure inside ``selfalign`` of
its module ``selfalign.stages.<stage>`` plus the entry point ``selfalign.cli`` (``bin/selfalign`` runs
``selfalign.cli:main``, which parses the arguments and loads the config before the stage's ``main``)
must equal the ``src/selfalign/**.py`` files the stage lists in ``deps``. The closure follows every
``import`` / ``from ... import`` statement, function-level ones included (the stages import heavy
modules lazily), skipping ``if TYPE_CHECKING:`` blocks (never run). Importing ``selfalign.a.b`` runs
``selfalign/a/__init__.py``, so package ``__init__`` files count, unless they hold no code (only a
docstring and dunder constants such as ``__version__``): those cannot change what a stage does.

It is an over-approximation on purpose: a module imported only inside a function the stage never
calls still counts. Missing a dependency silently reuses stale outputs; an extra one only re-runs a
stage.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "selfalign"
ENTRY_POINT = "selfalign.cli"
GENERATING = ("red_team", "self_align", "verbose_clone")


# ------------------------------------------------------------------------------------- closure
def module_file(name: str) -> Path | None:
    """The source file of module ``name`` under src/, or None (not a module: a class, a function)."""
    base = SRC.joinpath(*name.split("."))
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    if base.with_suffix(".py").exists():
        return base.with_suffix(".py")
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(path: Path) -> set[str]:
    """Every ``selfalign...`` name an import statement in ``path`` may load: ``from a.b import c`` gives
    ``a.b`` and ``a.b.c`` (``c`` may be a submodule); relative imports are resolved against the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(SRC).with_suffix("")
    package = list(rel.parts[:-1])  # a.b for a/b/c.py and for a/b/__init__.py alike
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package[: len(package) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def _holds_code(init: Path) -> bool:
    """False for an ``__init__.py`` with only a docstring and dunder constants (``__version__``)."""
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.startswith("__")
                                                for t in node.targets) and isinstance(node.value, ast.Constant):
            continue
        return True
    return False


def import_closure(roots: list[str]) -> set[str]:
    """Repo-relative paths of every selfalign source file loaded by importing ``roots``."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then c
            prefix = ".".join(parts[:i])
            path = module_file(prefix)
            if path is None or prefix in seen:
                continue
            seen.add(prefix)
            todo.extend(imported_names(path))
    files = {module_file(n) for n in seen}
    return {str(f.relative_to(ROOT)) for f in files if f is not None and (f.name != "__init__.py" or _holds_code(f))}


# ------------------------------------------------------------------------------------- dvc.yaml
def _dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _stage_name(cmd: str) -> str | None:
    m = re.match(r"bin/selfalign\s+(\w+)\b", " ".join(cmd.split()))
    return m.group(1) if m else None


def _declared_code(deps: list) -> set[str]:
    """The ``src/selfalign`` Python files a deps list names (a directory names every file under it)."""
    out: set[str] = set()
    for dep in deps:
        dep = str(dep).rstrip("/")
        if not dep.startswith(f"src/{PACKAGE}"):
            continue
        path = ROOT / dep
        if path.is_dir():
            out.update(str(p.relative_to(ROOT)) for p in path.rglob("*.py"))
        else:
            out.add(dep)
    return out


def _resolve_item(value: object, item: dict) -> object:
    if isinstance(value, str):
        return re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item[m.group(1)]), value)
    return value


def stage_declarations() -> dict[str, dict]:
    """``{dvc stage: {module, deps, params}}`` for every ``bin/selfalign <stage>`` stage; a ``foreach``
    stage gives one entry per item (``evaluate@base`` ...) with ``${item.*}`` substituted."""
    out: dict[str, dict] = {}
    for name, stage in _dvc().items():
        if "foreach" in stage:
            for key, item in stage["foreach"].items():
                do = stage["do"]
                module = _stage_name(do["cmd"])
                if module is not None:
                    out[f"{name}@{key}"] = {"module": module,
                                            "deps": [_resolve_item(d, item) for d in do.get("deps", [])],
                                            "params": [_resolve_item(p, item) for p in do.get("params", [])]}
            continue
        module = _stage_name(stage["cmd"])
        if module is not None:
            out[name] = {"module": module, "deps": stage.get("deps", []), "params": stage.get("params", [])}
    return out


STAGES = stage_declarations()


# ----------------------------------------------------------------------------------------- tests
def test_every_stage_module_is_found():
    assert STAGES, "dvc.yaml: no `bin/selfalign <stage>` stages found"
    for name, decl in STAGES.items():
        assert module_file(f"{PACKAGE}.stages.{decl['module']}") is not None, f"{name}: no module for its cmd"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_equal_the_code_it_imports(name):
    decl = STAGES[name]
    wanted = import_closure([f"{PACKAGE}.stages.{decl['module']}", ENTRY_POINT])
    declared = _declared_code(decl["deps"])
    missing, extra = sorted(wanted - declared), sorted(declared - wanted)
    assert not missing and not extra, (
        f"dvc.yaml stage {name}: deps disagree with the import closure of selfalign.stages.{decl['module']}\n"
        f"  missing (imported, not declared): {missing}\n  extra (declared, never imported): {extra}")


def test_closure_follows_function_level_imports_and_init_files():
    """The mechanism itself, on code that does not move: the HF engine imports the tokenizer loaders of
    models.py inside a function; generation/__init__.py holds make_engine (code), stages/ does not."""
    closure = import_closure(["selfalign.generation.hf"])
    assert {"src/selfalign/models.py", "src/selfalign/generation/__init__.py", "src/selfalign/config.py"} <= closure
    assert "src/selfalign/stages/__init__.py" not in import_closure(["selfalign.stages.red_team"])


SCORER = "src/selfalign/generation/scoring.py"
SCORING_STAGES = sorted(n for n in STAGES if n.startswith("evaluate@"))


@pytest.mark.parametrize("name", SCORING_STAGES)
def test_evaluation_stages_run_the_scorer(name):
    """The packed log-likelihood scorer is behind every multiple-choice number: evaluate must re-run when it changes."""
    assert SCORER in import_closure([f"{PACKAGE}.stages.{STAGES[name]['module']}", ENTRY_POINT])


@pytest.mark.parametrize("name", GENERATING + ("judge",))
def test_generating_stages_do_not_run_the_scorer(name):
    """Touching generation/scoring.py must re-run no generating stage: the engine (hf.py, vllm.py) and what
    the generating stages import never import the scorer (engrave neither: training uses attention.py)."""
    closure = import_closure([f"{PACKAGE}.stages.{STAGES[name]['module']}", ENTRY_POINT])
    assert SCORER not in closure, f"{name} imports {SCORER}: a scoring change would re-run it"


def test_engines_do_not_import_the_scorer():
    for engine in ("hf", "vllm", "openai"):
        assert SCORER not in import_closure([f"{PACKAGE}.generation.{engine}"]), engine


def _param_keys(params: list) -> list[str]:
    keys: list[str] = []
    for p in params:
        keys.extend(p.keys() if isinstance(p, dict) else [str(p)])  # {file: [keys]} entries too
    return keys


@pytest.mark.parametrize("name", GENERATING)
def test_generating_stages_do_not_depend_on_scoring_params(name):
    """Changing generation.score_token_budget (log-likelihood scoring only) must re-run no generation."""
    keys = _param_keys(STAGES[name]["params"])
    bad = [k for k in keys if k == "generation" or k.startswith("generation.score_token_budget")]
    assert not bad, f"dvc.yaml stage {name}: params {bad} make scoring knobs re-run generation; declare the keys"


# ----------------------------------------------------------------------------------------- params
# pydantic methods on a section or on the whole config: a call, not a field read
_METHODS = {"model_copy", "model_dump", "model_dump_json", "model_fields", "model_validate"}


def config_reads(path: Path) -> set[str]:
    """``section`` / ``section.field`` for every ``config.<section>[.<field>]`` chain in ``path``.

    Coarse on purpose: only chains rooted at a name ``config`` (the convention for the whole
    :class:`selfalign.config.Config`), so reads through an alias (``cfg = config.red_team``) count as a
    read of their section, and a whole-config dump (``config.model_dump_json()``) is not a field read."""
    reads: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Attribute):
            continue
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if not (isinstance(base, ast.Name) and base.id == "config"):
            continue
        chain.reverse()
        if chain[0] in _METHODS:
            continue
        reads.add(chain[0] if len(chain) == 1 or chain[1] in _METHODS else f"{chain[0]}.{chain[1]}")
    return {r for r in reads if not any(o.startswith(r + ".") for o in reads)}


def _covered(read: str, keys: list[str]) -> bool:
    section = read.split(".")[0]
    return any(k == section or k == read or k.startswith(read + ".") or read.startswith(k + ".")
               or ("." not in read and k.startswith(section + ".")) for k in keys)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_declares_the_params_its_module_reads(name):
    """Coarse: the stage module's own ``config.<section>.<field>`` reads (not its imports': those are
    over-approximated and would demand params of code paths the stage never takes, e.g. the lm-eval
    variants' ``self_align`` for ``evaluate@base``) must each be covered by a declared params key."""
    decl = STAGES[name]
    keys = _param_keys(decl["params"])
    reads = config_reads(module_file(f"{PACKAGE}.stages.{decl['module']}"))
    missing = sorted(r for r in reads if not _covered(r, keys))
    assert not missing, f"dvc.yaml stage {name}: reads params {missing} that it does not declare"


# ------------------------------------------------------------------------------------------ file params
def _params_leaves(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_params_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


PARAMS = _params_leaves(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))


def _declares(keys: list[str], dotted: str) -> bool:
    return any(dotted == k or dotted.startswith(k + ".") for k in keys)


def file_params(name: str) -> dict[str, str]:
    """The declared params of stage ``name`` whose params.yaml value names a file or directory of the repo."""
    keys = _param_keys(STAGES[name]["params"])
    return {k: v for k, v in PARAMS.items()
            if _declares(keys, k) and isinstance(v, str) and v and (ROOT / v).exists()}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_file_params_are_interpolated_deps(name):
    """A param naming a file the stage reads is the dep ``${key}``, never the file's literal path: with a literal,
    pointing the param at another file (an ablation, a profile) left edits to that file invisible to DVC."""
    deps = [str(d) for d in STAGES[name]["deps"]]
    bad = {k: v for k, v in file_params(name).items() if f"${{{k}}}" not in deps}
    assert not bad, (f"dvc.yaml stage {name}: file params not declared as ${{...}} deps: "
                     + ", ".join(f"${{{k}}} (literal {v!r})" if v in deps else f"${{{k}}}" for k, v in bad.items()))


def _config_files(data: object, where: str = "") -> dict[str, str]:
    """Every non-null ``<stage>.train.launcher.config_file`` in a params file, by its dotted key."""
    if not isinstance(data, dict):
        return {}
    out = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if dotted.endswith(".launcher") and isinstance(value, dict) and value.get("config_file"):
            out[f"{dotted}.config_file"] = value["config_file"]
        out.update(_config_files(value, dotted))
    return out


PARAMS_FILES = [ROOT / "params.yaml", *sorted((ROOT / "params").glob("*.yaml"))]
LAUNCHER_FILES = {f"{p.relative_to(ROOT)}: {k}": v for p in PARAMS_FILES
                  for k, v in _config_files(yaml.safe_load(p.read_text(encoding="utf-8"))).items()}


@pytest.mark.parametrize("where", sorted(LAUNCHER_FILES))
def test_launcher_config_file_lies_under_a_declared_dep(where):
    """``launcher.config_file`` is read by ``accelerate launch``, not as a ``${...}`` dep (null cannot be
    interpolated): the stage depends on its whole directory, so an edit to the file re-runs the stage."""
    key, path = where.split(": ", 1)[1], Path(LAUNCHER_FILES[where])
    deps = [Path(str(d)) for d in STAGES[key.split(".")[0]]["deps"] if "${" not in str(d)]
    assert (ROOT / path).is_file(), f"{where}: {path} does not exist"
    assert any(path == d or d in path.parents for d in deps), f"{where}: {path} lies under no dep of the stage"


def test_the_paper_profile_sets_a_launcher_config_file():
    """The parametrised check above is not vacuous: the paper profile points both stages at FSDP."""
    assert {k.split(": ")[1] for k in LAUNCHER_FILES} >= {"engrave.train.launcher.config_file",
                                                          "verbose_clone.train.launcher.config_file"}


def test_a_launcher_config_file_outside_the_dep_is_refused():
    from selfalign.config import ConfigError, LauncherConfig

    ok = {"kind": "accelerate", "num_processes": 2, "mixed_precision": None}
    assert LauncherConfig(**ok, config_file="./configs/accelerate/ddp.yaml").config_file
    for bad in ("my/ddp.yaml", "configs/accelerate/../ddp.yaml", "/etc/ddp.yaml"):
        with pytest.raises((ConfigError, ValueError), match="configs/accelerate"):
            LauncherConfig(**ok, config_file=bad)
