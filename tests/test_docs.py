"""The README and the pages under docs/: links that lead somewhere, commands that exist, code paths that are there.

The README is the front page (about 200 lines at most) and links every page under docs/. Every
``histoembed ...`` command shown in them (fenced code blocks and inline code) must parse against the
real command line: the verb and every option exist (``--help`` appended, so nothing runs). The commands
of stages with settings are also resolved through ``histoembed config STAGE ...``, which checks their
values (a number, a choice, a head name) without running the stage. A few short ones run for real on a
tiny synthetic dataset. Module paths (``histoembed/models/heads/``) and dotted names
(``histoembed.models.heads.REGISTRY``) named in the text must exist, so a moved module cannot leave the
docs behind.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histoembed.cli.app import STAGE_TABLES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE = re.compile(r"`(histoembed [^`]+)`")
SHELL_OPERATORS = {">", ">>", "<", "|", "||", "&&", ";", "&"}
MAX_README_LINES = 200


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def links(path: Path) -> list[str]:
    return [t for t in LINK.findall(FENCE.sub("", path.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not checked


def block_commands(text: str) -> list[str]:
    """Lines of fenced code blocks that start with ``histoembed ``, continuation lines joined."""
    found = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        found += [line.strip() for line in joined.splitlines() if line.strip().startswith("histoembed ")]
    return found


def inline_commands(text: str) -> list[str]:
    return [m.replace("\n", " ") for m in INLINE.findall(FENCE.sub("", text))]


def argv(command: str) -> list[str] | None:
    """The arguments after ``histoembed``, shell comments and redirections dropped; None for a placeholder line."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    for i, token in enumerate(tokens):
        if token in SHELL_OPERATORS:
            tokens = tokens[:i]
            break
    args = tokens[1:]
    if not args or any(t in ("...", "…") or t.startswith(("<", "[")) for t in args):
        return None
    if args[0].isupper() or (args[0].startswith("--") and len(args) > 1 and args[1].isupper()):
        return None  # `histoembed VERB`, `histoembed --no-progress COMMAND`
    return args


def shown_commands(inline: bool) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for command in (inline_commands(text) if inline else block_commands(text)):
            if argv(command) is not None:
                found.append((rel(page), command))
    return found


BLOCK_COMMANDS = shown_commands(inline=False)
INLINE_COMMANDS = shown_commands(inline=True)
STAGE_COMMANDS = [(p, c) for p, c in BLOCK_COMMANDS if argv(c)[0] in STAGE_TABLES]  # the stages with settings


@pytest.fixture(scope="module")
def app():
    from histoembed.cli import app

    return app


def invoke(app, args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=False)


# --- the front page and its links ------------------------------------------------------------------------------


def test_readme_is_a_front_page_that_links_every_docs_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    linked = {(README.parent / t.split("#")[0]).resolve() for t in links(README)}
    assert DOCS, "docs/ holds no page"
    assert not [rel(p) for p in DOCS if p.resolve() not in linked], "docs pages the README does not link"
    text = README.read_text()
    for needed in ("## Set-up", "## Data layouts", "## Where outputs go", "## Where the code lives",
                   "histoembed/cli/", "histoembed/models/heads/"):
        assert needed in text, needed


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_lead_to_files_and_headings(page):
    dead = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            dead.append(target)
    assert not dead, f"{rel(page)}: dead links {dead}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_module_paths_and_names_in_the_text_exist(page):
    text = page.read_text()
    missing = [p for p in set(re.findall(r"\bhistoembed/[a-z0-9_/]*(?:\.py|/)", text)) if not (ROOT / p).exists()]
    for name in set(re.findall(r"\bhistoembed(?:\.\w+)+", text)):
        if name.endswith(".toml"):
            continue
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert not missing, f"{rel(page)} names what does not exist: {sorted(missing)}"


def test_python_blocks_import_and_call_what_exists():
    """The docs' Python examples import what exists and call functions their modules have (``qc.run_qc``)."""
    python = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
    blocks = [b for page in PAGES for b in python.findall(page.read_text())]
    assert blocks
    for block in blocks:
        names: dict = {}
        for line in block.splitlines():
            if re.match(r"(from histoembed\S* import |import histoembed)", line):
                exec(line.split("#")[0], names)  # noqa: S102 - the docs' own import lines
        calls = re.findall(r"\b(\w+)\.(\w+)\(", block)
        missing = [f"{m}.{f}" for m, f in calls if m in names and not hasattr(names[m], f)]
        assert not missing, f"the Python example calls what does not exist: {missing}"


# --- the commands shown parse against the real command line -----------------------------------------------------


def test_the_docs_show_commands():
    assert len(BLOCK_COMMANDS) >= 10 and len(INLINE_COMMANDS) >= 5
    assert {tuple(argv(c)) for _, c in BLOCK_COMMANDS} >= {("qc",), ("crops",), ("submit",)}


@pytest.mark.parametrize(("page", "command"), BLOCK_COMMANDS + INLINE_COMMANDS,
                         ids=[f"{p}: {c}" for p, c in BLOCK_COMMANDS + INLINE_COMMANDS])
def test_command_parses(app, page, command):
    """The verb and every option exist: ``--help`` appended, a wrong option exits 2 ("No such option")."""
    res = invoke(app, [*argv(command), "--help"])
    assert res.exit_code == 0, f"{page}: `{command}` does not parse:\n{res.output}"
    assert "Usage:" in res.output


@pytest.mark.parametrize(("page", "command"), STAGE_COMMANDS, ids=[f"{p}: {c}" for p, c in STAGE_COMMANDS])
def test_stage_command_values_resolve(app, page, command, tmp_path, monkeypatch):
    """A stage's options, values included, resolve to settings (``histoembed config STAGE ...``; nothing runs)."""
    args = argv(command)
    monkeypatch.chdir(tmp_path)
    res = invoke(app, ["config", *args])
    assert res.exit_code == 0, f"{page}: `{command}` does not resolve:\n{res.output}"
    assert not list(tmp_path.iterdir()), "histoembed config ran the stage"


# --- a few short ones, for real ---------------------------------------------------------------------------------


def readme_command(verb: str) -> list[str]:
    """The README's own line for ``histoembed VERB`` (the first one in a code block)."""
    return next(argv(c) for p, c in BLOCK_COMMANDS if p == "README.md" and argv(c)[0] == verb)


def test_the_readme_first_commands_run_on_a_small_dataset(app, tmp_path, monkeypatch):
    """`histoembed config > histoembed.toml`, `histoembed qc` and `histoembed crops`, as the README writes them."""
    import tomllib

    from histoembed.core import config as cfg
    from histoembed.core import settings_file
    from histoembed.tools.synthetic import make_dataset

    make_dataset(tmp_path / "data", n_train=8, n_test=3, seed=0, size_range=(96, 128), outliers=False)
    monkeypatch.chdir(tmp_path)

    assert readme_command("config") == ["config"]  # `histoembed config > histoembed.toml`
    res = invoke(app, ["config"])
    assert res.exit_code == 0, res.output
    settings = tomllib.loads(res.stdout)
    assert cfg.Settings.model_validate(settings) == cfg.Settings()
    settings["qc"]["workers"] = settings["crops"]["workers"] = 1  # the file as a user edits it: one process,
    settings["crops"]["size"] = 64                                # small crops
    (tmp_path / settings_file.CONFIG_FILE).write_text(settings_file.to_toml(settings))

    for verb, output in (("qc", "qc.parquet"), ("crops", "crops.parquet")):
        args = readme_command(verb)
        assert args == [verb]
        res = invoke(app, args)
        assert res.exit_code == 0, f"`histoembed {verb}`:\n{res.output}"
        assert (tmp_path / "run" / output).exists()
