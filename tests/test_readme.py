"""The README's code blocks, run or checked, so that the README cannot drift from the code.

Every fenced block in README.md carries a marker in an HTML comment on the line above it:

- ``<!-- readme: run -->``: its commands run, in README order, in a sandbox laid out like a
  fresh clone's root (``../shared`` beside it, so MNIST is found as the README says), with
  short-epoch overrides (`shorten`); a ``python`` block runs as a script there.
- ``<!-- readme: output-of CMD; CMD -->``: the block is those commands' output; they run (with
  the same overrides) and every line of the block, figures masked (`masked`), must be a line
  of what they print.
- ``<!-- readme: check REASON -->``: too long for the suite, or about the user's own files
  (REASON says which); each command's ``--help`` runs and every option it uses must exist
  (and a choice must be one the option offers).
- ``<!-- readme: text REASON -->``: not commands (a diagram, a file's contents).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = re.compile(r"<!--\s*readme:\s*(run|output-of|check|text)\b\s*(.*?)\s*-->")
BIN = Path(sys.executable).parent
TRAIN_EPOCHS, RESUME_EPOCHS, MNIST_LIMIT = 2, 3, 1000  # `shorten`


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    kind: str  # run | output-of | check | text
    note: str
    body: str

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.kind})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block with the marker above it (kind "" when it has none)."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, language = i, lines[i][3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            found = MARKER.search(above)
            blocks.append(Block(start + 1, language, found.group(1) if found else "", found.group(2) if found else "",
                                "\n".join(lines[start + 1:end])))
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def commands(body: str) -> list[list[str]]:
    """The shell commands of a bash block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def shorten(argv: list[str]) -> list[str]:
    """The same command, short enough for the suite: a training run of TRAIN_EPOCHS epochs
    (a resumed one: RESUME_EPOCHS) on at most MNIST_LIMIT images; everything else as written."""
    argv = list(argv)
    if argv[:1] != ["aae-train"] or len(argv) < 2 or argv[1] not in ("mnist", "folder"):
        return argv
    epochs = str(RESUME_EPOCHS if "--resume" in argv else TRAIN_EPOCHS)
    _set(argv, "--epochs", epochs)
    if argv[1] == "mnist" and "--resume" not in argv:  # a resumed run keeps its checkpoint's data
        limit = int(argv[argv.index("--limit") + 1]) if "--limit" in argv else MNIST_LIMIT
        _set(argv, "--limit", str(min(limit, MNIST_LIMIT)))
    return argv + ["--threads", "1"]


def _set(argv: list[str], option: str, value: str) -> None:
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]


def masked(line: str) -> str:
    """A line with what varies from run to run masked: figures, flags, widths of table rules."""
    line = re.sub(r"\b[0-9a-f]{12,32}\b", "ID", line)  # export ids
    line = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", line)
    line = re.sub(r"\b(yes|no)\b", "FLAG", line)
    line = re.sub(r"([━─┳┻╇┃│┏┓┗┛┡┩└┘┬┴┼])\1+", r"\1", line)
    line = re.sub(r" \(N threads?\)$", "", line)  # the epoch line's thread count: the cores left idle, machine by machine
    return " ".join(line.split())


# ---- checking a command without running it -------------------------------------------------


def _apps():
    from aae_runtime.cli import app as run_app
    from aae_train.cli import app as train_app
    from export.cli import app as export_app

    return {"aae-run": run_app, "aae-train": train_app, "aae-export": export_app}


def _root(program: str):
    import typer.main

    return typer.main.get_command(_apps()[program])


def _click_command(argv: list[str]):
    root = _root(argv[0])
    sub = getattr(root, "commands", None)
    if sub:
        assert len(argv) > 1 and argv[1] in sub, f"{shlex.join(argv)}: no command {argv[1:2]} (has {sorted(sub)})"
        return sub[argv[1]], argv[2:]
    return root, argv[1:]


def check_options(argv: list[str]) -> None:
    """Every option of ``argv`` exists on its command, with a value the option accepts when it
    offers choices, and the command's --help works."""
    from typer.testing import CliRunner

    command, rest = _click_command(argv)
    options = {name: p for p in command.params for name in (*p.opts, *getattr(p, "secondary_opts", ()))}
    for i, token in enumerate(rest):
        if not token.startswith("-") or re.fullmatch(r"-\d.*", token):
            continue
        name = token.split("=")[0]
        assert name in options or name == "--help", f"{shlex.join(argv)}: {name} is not an option of it"
        choices = getattr(getattr(options.get(name), "type", None), "choices", None)
        if choices and not getattr(options[name], "is_flag", False):
            value = token.split("=", 1)[1] if "=" in token else rest[i + 1]
            assert value in {str(c) for c in choices}, f"{shlex.join(argv)}: {value!r} is not a choice of {name}"
    help_argv = [argv[1], "--help"] if getattr(_root(argv[0]), "commands", None) else ["--help"]
    result = CliRunner().invoke(_apps()[argv[0]], help_argv)
    assert result.exit_code == 0, f"{shlex.join(argv)}: --help failed: {result.output[-300:]}"


@functools.cache
def script_help(script: str) -> str:
    r = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{script} --help: {r.stderr[-300:]}"
    return r.stdout


def check_command(argv: list[str]) -> None:
    """A command of a `check` block: what can be checked without running it."""
    if argv[0] in ("aae-run", "aae-train", "aae-export"):
        check_options(argv)
    elif argv[0] == "python" and argv[1].startswith("benchmarks/"):
        text = script_help(argv[1])
        for token in argv[2:]:
            if token.startswith("--"):
                assert re.search(rf"(^|[\s,\[]){re.escape(token.split('=')[0])}\b", text), f"{shlex.join(argv)}: {token} unknown"
    elif argv[0] == "make":
        dry = subprocess.run(["make", "-n", *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, f"{shlex.join(argv)}: {dry.stderr[-300:]}"
        for line in dry.stdout.splitlines():  # the recipe's own aae-* commands, e.g. `.venv/bin/aae-train mnist ...`
            words = shlex.split(line.split(";")[0]) if "aae-" in line else []
            if words and Path(words[0]).name in ("aae-run", "aae-train", "aae-export"):
                check_options([Path(words[0]).name, *words[1:]])
    elif argv[:2] == ["pip", "install"]:
        section = (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
        extras = set(re.findall(r"^(\w+) = \[", section, re.MULTILINE))
        for target in argv[2:]:
            found = re.fullmatch(r"\.\[([\w,]+)\]", target)
            if found:
                assert set(found.group(1).split(",")) <= extras, f"{shlex.join(argv)}: extras are {sorted(extras)}"
            else:
                assert target in ("torch", "--index-url", "https://download.pytorch.org/whl/cpu"), f"{shlex.join(argv)}: {target}?"
    elif argv[0] == "torchrun":  # its own options, then `-m aae_train` and the aae-train command line
        assert "-m" in argv and argv[argv.index("-m") + 1] == "aae_train", f"{shlex.join(argv)}: torchrun -m aae_train ..."
        check_options(["aae-train", *argv[argv.index("-m") + 2:]])
    elif argv[0] == "source":
        assert argv[1] == ".venv/bin/activate", f"{shlex.join(argv)}: the README's venv is .venv"
    elif argv[:3] == [".venv/bin/python", "-m", "pytest"]:
        marks = re.findall(r"\b(\w+)\b", " ".join(argv[argv.index("-m", 3) + 1:])) if "-m" in argv[3:] else []
        registered = (REPO / "pyproject.toml").read_text()
        assert all(m in ("not", "and", "or") or f'"{m}:' in registered for m in marks), f"{shlex.join(argv)}: unknown marker"
    else:
        raise AssertionError(f"the README test cannot check {shlex.join(argv)}: add a way here, or mark the block text")


# ---- the tests ------------------------------------------------------------------------------


def test_every_block_is_marked():
    unmarked = [str(b) for b in BLOCKS if not b.kind]
    assert not unmarked, f"blocks without a <!-- readme: ... --> marker: {unmarked}"
    assert all(b.note for b in BLOCKS if b.kind in ("check", "text", "output-of")), "check/text blocks say why"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "check"], ids=str)
def test_checked_blocks_use_real_commands_and_options(block):
    for argv in commands(block.body):
        check_command(argv)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, mnist_dir):
    """A fresh clone's root as the README sees it: cwd, with ../shared/data/mnist beside it and
    no download possible; the venv's commands first on PATH."""
    root = tmp_path_factory.mktemp("readme")
    (root / "shared" / "data").mkdir(parents=True)
    (root / "shared" / "data" / "mnist").symlink_to(Path(mnist_dir).resolve())
    repo = root / "repo"
    repo.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "AAE_DATA_DIR"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", XDG_CACHE_HOME=str(root / "no-cache"),
               PYTHONPATH=str(REPO), COLUMNS="200")
    return repo, env


def _run(argv: list[str], cwd: Path, env: dict) -> str:
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{shlex.join(argv)} exited {r.returncode}: {(r.stderr or r.stdout)[-600:]}"
    return r.stdout + r.stderr


@pytest.mark.e2e
def test_run_blocks_run_and_output_blocks_match(sandbox):
    """The run and output blocks in README order, in one sandbox: each builds on the last."""
    repo, env = sandbox
    for block in [b for b in BLOCKS if b.kind in ("run", "output-of")]:
        if block.kind == "run" and block.language == "python":
            script = repo / f"readme_{block.line}.py"
            script.write_text(block.body)
            _run([sys.executable, script.name], repo, env)
        elif block.kind == "run":
            for argv in commands(block.body):
                _run(shorten(argv), repo, env)
        else:
            printed = ""
            for part in block.note.split(";"):
                printed += _run(shorten(shlex.split(part)), repo, env)
            got = {masked(line) for line in printed.splitlines()}
            missing = [line for line in block.body.splitlines() if line.strip() not in ("", "...")
                       and masked(line) not in got]
            assert not missing, f"{block}: lines the commands no longer print: {missing[:3]}\n--- they printed:\n{printed[-1500:]}"
            shown = {masked(line) for line in block.body.splitlines()}  # "...": more lines like the one above (epochs)
            unshown = [line for line in printed.splitlines() if line.strip() and masked(line) not in shown]
            assert not unshown, f"{block}: lines the commands print that the README does not show: {unshown[:3]}"
