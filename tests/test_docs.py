"""The documentation is true: every command that README.md and docs/*.md show is accepted by its tool.

A command is a line of a fenced ``bash`` / ``sh`` / ``shell`` block, a ``$ `` line of a ``console`` block, or an
inline code span that starts with ``selfalign``, ``.venv/bin/``, ``make`` or ``dvc``. Each simple command (split at
``&&``, ``;``, ``|``, ``&``, parentheses) goes to the real parser of its program, without running it: a renamed
subcommand, a removed flag or a placeholder such as ``<name>`` fails here instead of in a newcomer's terminal.
Beyond the parse, what a command names must exist: ``make`` targets, ``dvc repro`` stages, ``-S`` params,
``ablate`` principles, ``profile`` files, config files. Relative links (and their ``#anchors``) must resolve.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150  # issue 23: a README that reads in five minutes

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_COMMANDS = ("selfalign ", ".venv/bin/", "make ", "dvc ")
SHELL_BLOCKS = {"bash", "sh", "shell"}
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
REDIRECTS = {">", ">>", "<", "2>"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"<[A-Za-z][\w .-]*>|…")
UNCHECKED = {"cd", "curl", "git", "export"}  # shell built-ins and outside tools: nothing of ours to check


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str
    inline: bool = False  # an inline span in prose: ``selfalign compare`` alone names a command

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def _strip_fences(text: str) -> str:
    """The text with fenced blocks blanked (line numbers kept), so inline spans come from prose only."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def _block_lines(lang: str, body: str) -> list[tuple[int, str]]:
    """(offset, logical line) of the commands in one fenced block: continuations joined, output lines left out."""
    out, pending, start = [], "", 0
    for i, line in enumerate(body.splitlines()):
        if lang == "console":
            if line.startswith("$ "):
                out.append((i, line[2:]))
            continue
        if not pending:
            start = i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        if logical and not logical.startswith("#"):
            out.append((start, logical))
    return out


def doc_commands(path: Path) -> list[Command]:
    text = path.read_text(encoding="utf-8")
    name = str(path.relative_to(ROOT))
    found = []
    for m in FENCE.finditer(text):
        lang = m.group(1).lower()
        if lang not in SHELL_BLOCKS | {"console"}:
            continue
        first = text.count("\n", 0, m.start(2)) + 1
        found += [Command(name, first + off, line) for off, line in _block_lines(lang, m.group(2))]
    prose = _strip_fences(text)
    for m in INLINE.finditer(prose):
        span = m.group(1).strip()
        if span.startswith(INLINE_COMMANDS):
            found.append(Command(name, prose.count("\n", 0, m.start()) + 1, span, inline=True))
    return found


def simple_commands(line: str) -> list[list[str]]:
    """The argv of every simple command on a shell line (env assignments and redirections removed)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    commands, current, skip_next = [], [], False
    for token in lex:
        if skip_next:
            skip_next = False
        elif token in OPERATORS:
            commands.append(current)
            current = []
        elif token in REDIRECTS:
            skip_next = True
        elif not current and ENV_ASSIGNMENT.match(token):
            continue
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


ALL_COMMANDS = [c for doc in DOCS for c in doc_commands(doc)]


# ---- checkers: one per program, each raises AssertionError naming what is wrong -------------------------------

def _parse_exits(parse, argv: list[str]) -> str | None:
    """Run an argparse-style ``parse(argv)``; the error text if it rejects argv (``--help`` is accepted)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    return None


def _param_exists(dotted: str) -> bool:
    node = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _subcommands(parser) -> dict:
    import argparse

    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def check_selfalign_name(args: list[str]) -> None:
    """Prose naming a command (``selfalign compare``, ``selfalign bench dedup``): the command exists."""
    from selfalign.cli import build_parser

    parser = build_parser()
    for word in args:
        choices = _subcommands(parser)
        assert word in choices, f"no command `{word}` (selfalign has {sorted(choices)})"
        parser = choices[word]


def check_selfalign(args: list[str]) -> None:
    from selfalign.cli import build_parser

    parser = build_parser()
    error = _parse_exits(parser.parse_args, args)
    assert error is None, f"selfalign rejects it: {error}"
    if "--help" in args or "-h" in args:
        return
    ns = parser.parse_args(args)
    if ns.command == "ablate" and getattr(ns, "principles", None) not in (None, "all"):
        known = {p["name"] for p in yaml.safe_load((ROOT / "principles/principles.yaml").read_text(encoding="utf-8"))}
        unknown = set(ns.principles.split(",")) - known
        assert not unknown, f"no such principle in principles/principles.yaml: {sorted(unknown)}"
    if ns.command == "profile" and getattr(ns, "name", None):
        assert (ROOT / ns.dir / f"{ns.name}.yaml").is_file(), f"no profile {ns.dir}/{ns.name}.yaml"


def check_make(args: list[str]) -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", makefile, re.M))
    wanted = [a for a in args if not ENV_ASSIGNMENT.match(a)]
    missing = [t for t in wanted if t not in targets]
    assert not missing, f"no make target {missing} (Makefile has {sorted(targets)})"


def check_dvc(args: list[str]) -> None:
    from dvc.cli import DvcParserError, parse_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            ns = parse_args(args)
    except (DvcParserError, SystemExit) as exc:
        raise AssertionError(f"dvc rejects it: {err.getvalue().strip() or exc!r}") from None
    if args[:1] == ["repro"] and ns.targets:
        stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
        unknown = [t for t in ns.targets if t.split("@")[0] not in stages]
        assert not unknown, f"no such stage in dvc.yaml: {unknown}"
    for override in getattr(ns, "set_param", None) or []:
        key = override.split("=", 1)[0]
        assert _param_exists(key), f"-S {key}: no such key in params.yaml"


def check_mlflow(args: list[str]) -> None:
    import click
    from mlflow.cli import cli

    try:
        ctx = cli.make_context("mlflow", list(args), resilient_parsing=False)
        name, command, rest = cli.resolve_command(ctx, ctx.protected_args + ctx.args)
        command.make_context(name, rest, parent=ctx)
    except click.ClickException as exc:
        raise AssertionError(f"mlflow rejects it: {exc.format_message()}") from None


def check_lm_eval(args: list[str]) -> None:
    from lm_eval._cli import HarnessCLI

    parser = HarnessCLI()._parser
    error = _parse_exits(parser.parse_args, args)
    assert error is None, f"lm_eval rejects it: {error}"
    ns = parser.parse_args(args)
    include = getattr(ns, "include_path", None)
    assert include is None or (ROOT / include).is_dir(), f"--include_path {include} does not exist"


def check_accelerate(args: list[str]) -> None:
    from accelerate.commands.launch import launch_command_parser

    assert args[:1] == ["launch"], f"only `accelerate launch` is documented, got {args[:1]}"
    parser = launch_command_parser()
    error = _parse_exits(parser.parse_args, args[1:])
    assert error is None, f"accelerate launch rejects it: {error}"
    ns = parser.parse_args(args[1:])
    assert ns.config_file is None or (ROOT / ns.config_file).is_file(), f"no config file {ns.config_file}"
    if ns.module and ns.training_script == "selfalign.cli":
        check_selfalign(ns.training_script_args)


CHECKERS = {
    "selfalign": check_selfalign,
    "make": check_make,
    "dvc": check_dvc,
    "mlflow": check_mlflow,
    "lm_eval": check_lm_eval,
    "lm-eval": check_lm_eval,
    "accelerate": check_accelerate,
}


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=str)
def test_documented_command_is_accepted(command: Command) -> None:
    if not command.inline:
        assert not PLACEHOLDER.search(command.text), f"{command}: a placeholder; show a command that runs as written"
    for argv in simple_commands(command.text):
        program = Path(argv[0]).name
        if program in UNCHECKED:
            continue
        assert program in CHECKERS, f"{command}: no checker for `{program}` (add one to tests/test_docs.py)"
        names_only = command.inline and program == "selfalign" and not any(a.startswith("-") for a in argv)
        try:
            (check_selfalign_name if names_only else CHECKERS[program])(argv[1:])
        except AssertionError as exc:
            raise AssertionError(f"{command}\n  {exc}") from None


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _strip_fences(path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


LINKS = [(doc, m.group(1), doc.read_text(encoding="utf-8").count("\n", 0, m.start()) + 1)
         for doc in DOCS for m in LINK.finditer(_strip_fences(doc.read_text(encoding="utf-8")))
         if not re.match(r"^[a-z]+:", m.group(1))]


@pytest.mark.parametrize("doc,target,line", LINKS, ids=[f"{d.relative_to(ROOT)}:{n}:{t}" for d, t, n in LINKS])
def test_relative_link_resolves(doc: Path, target: str, line: int) -> None:
    path, _, anchor = target.partition("#")
    dest = (doc.parent / path).resolve() if path else doc
    where = f"{doc.relative_to(ROOT)}:{line}: {target}"
    assert dest.exists(), f"{where}: {path} does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}"


def test_commands_were_found() -> None:
    """The extraction itself works: the README's quick start is among the commands checked."""
    texts = {c.text.split("#")[0].strip() for c in ALL_COMMANDS if c.doc == "README.md"}
    assert {"make setup", "make repro", "make test"} <= texts
    assert {c.doc for c in ALL_COMMANDS} >= {"README.md", "docs/tracking.md"}


def test_readme_is_short_and_shows_the_three_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    n = text.count("\n")
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move detail to docs/"
    for needed in ("make setup", "dvc repro", "make test"):
        assert needed in text, f"README.md does not show `{needed}`"


def test_a_placeholder_or_typo_is_caught() -> None:
    """The checkers fail on what a stale doc would show (so the tests above can fail)."""
    bad = ["selfalign ablate --principles no-such-principle", "selfalign compaer", "dvc exp run -n <name>",
           "make reproduce", "dvc repro no_such_stage", "dvc exp run -S engrave.no_such_knob=1",
           "selfalign profile no-such-profile", "mlflow uii", "accelerate launch --config_file no.yaml x.py"]
    for line in bad:
        with pytest.raises(AssertionError):
            for argv in simple_commands(line):
                CHECKERS[Path(argv[0]).name](argv[1:])
    assert PLACEHOLDER.search("selfalign profile <name>")
