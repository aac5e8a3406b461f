"""The README and docs/: the README stays short, every relative link resolves, and every `pipeline` command
and flag they show exists (read from the click command objects), as does every run_all.sh flag."""
import re
from pathlib import Path

import pytest

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 220


def _id(path):
    return path.relative_to(ROOT).as_posix()


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move details to docs/"


def _anchors(path: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_relative_links_resolve(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (doc.parent / path) if path else doc
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
            broken.append(target)
    assert not broken, f"{_id(doc)}: links to nothing: {broken}"


def _shell_snippets(text: str) -> list:
    """The shell code of a Markdown text: every ``` block but python ones, and every inline `code` span (on one
    line: a span may wrap)."""
    blocks = [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S) if lang != "python"]
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return blocks + [" ".join(span.split()) for span in spans]


def _commands(text: str):
    """(program, subcommand or None, the rest of the command line) of each `pipeline` / `run_all.sh` call."""
    for snippet in _shell_snippets(text):
        for line in snippet.replace("\\\n", " ").splitlines():
            line = re.split(r"(?:^|\s)#", line)[0]  # a comment
            for part in re.split(r"&&|\|\||;|\s\|\s", line):
                m = re.search(r"(?<!from )(?<!import )\bpipeline(?:\.cli)?\s+([a-z][-a-z0-9]*)(.*)", part)
                if m:
                    yield "pipeline", m[1], m[2]
                m = re.search(r"run_all\.sh(.*)", part)
                if m:
                    yield "run_all.sh", None, m[1]


def _flags(rest: str) -> list:
    return re.findall(r"(?<![\w-])--[a-z][-a-z0-9]*", rest)


RUN_ALL_FLAGS = set(re.findall(r"^\s*(?:-h\|)?(--[a-z][-a-z]*)\)", (ROOT / "run_all.sh").read_text(), re.M))


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_commands_and_flags_exist(doc):
    wrong = []
    for program, sub, rest in _commands(doc.read_text()):
        if program == "run_all.sh":
            wrong += [f"run_all.sh {f}" for f in _flags(rest) if f not in RUN_ALL_FLAGS]
        elif sub not in cli.commands:
            wrong.append(f"pipeline {sub} (no such command)")
        else:
            params = cli.commands[sub].params
            known = {o for p in params for o in (*p.opts, *getattr(p, "secondary_opts", ()))} | {"--help"}
            wrong += [f"pipeline {sub} {f}" for f in _flags(rest) if f not in known]
    assert not wrong, f"{_id(doc)} shows commands or flags the CLI does not have: {wrong}"


def test_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if "-m pytest" in line]
    assert ci == [".venv/bin/python -m pytest -q"], ci
    assert ci[0] in README.read_text()
