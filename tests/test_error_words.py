"""Errors in the caller's words: a library call names its Python argument (``variant``, ``tau=0.5``), never a
CLI flag; the CLI names its flag for the same bad input, on one line, without a traceback."""
import ast
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import fit_head
from pipeline.cli import cli, in_cli_words
from pipeline.synthetic import make_synthetic_cache
from pipeline.utils import UserError

# (fit_head arguments, the CLI's arguments for the same input, the argument / the flag the error names)
BAD = {
    "bad variant": (dict(head="ncm", variant="bogus"), ["--head", "ncm", "--variant", "bogus"], "variant"),
    "bad head": (dict(head="bogus"), ["--head", "bogus"], "head"),
    "negative tau": (dict(head="learned-ncm", tau=-0.5), ["--head", "learned-ncm", "--tau", "-0.5"], "tau"),
    "nan tau": (dict(head="learned-ncm", tau=float("nan")), ["--head", "learned-ncm", "--tau", "nan"], "tau"),
    "tau on a head without tau": (dict(head="ncm", tau=0.5), ["--head", "ncm", "--tau", "0.5"], "tau"),
    "bad eval split": (dict(head="ncm", eval_split="train"), ["--head", "ncm", "--eval-split", "train"],
                       "eval_split"),
    "bad metric": (dict(head="metric-ncm", metric="cosine"), ["--head", "metric-ncm", "--metric", "cosine"],
                   "metric"),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("words") / "run"
    d.mkdir()
    return make_synthetic_cache(d / "features.h5", num_classes=5, dim=4, n_max=100, n_test=5)


@pytest.mark.parametrize("case", sorted(BAD))
def test_library_error_names_the_python_argument(cache, case):
    kwargs, _, name = BAD[case]
    with pytest.raises(UserError) as e:
        fit_head(cache, device="cpu", **kwargs)
    msg = str(e.value)
    assert "--" not in msg and name in msg and "\n" not in msg, msg


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_error_names_the_flag(cache, tmp_path, case):
    _, args, name = BAD[case]
    r = CliRunner().invoke(cli, ["fit-head", "--cache", str(cache.parent), "--device", "cpu", *args])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "--" + name.replace("_", "-") in errors[0], r.output
    assert not (cache.parent / "results.csv").exists()


def test_cli_words_turn_arguments_into_flags():
    extract, report = cli.commands["extract"], cli.commands["report"]
    assert in_cli_words("use another run=... / cache_dir=..., or overwrite=True to replace it", extract) == \
        "use another --run-name / --cache-dir, or --overwrite to replace it"
    assert in_cli_words("pass precision='bf16', or allow_precision_change=True", extract) == \
        "pass --precision bf16, or --allow-precision-change"
    assert in_cli_words("one in r has 3 (figures=False); pass force=True", report) == \
        "one in r has 3 (--no-figures); pass --force"
    # only the command's own options; a path holding "name=" is left alone
    assert in_cli_words("tau=0.5 at /data/seed=3", report) == "tau=0.5 at /data/seed=3"
    assert in_cli_words("pass another results_path=...", cli.commands["fit-head"]) == "pass another --results"
    assert in_cli_words("rerun with workers=1 (one process)", report) == "rerun with --fit-workers 1 (one process)"


LIBRARY = [p for p in sorted((Path(__file__).resolve().parents[1] / "pipeline").rglob("*.py")) if p.name != "cli.py"]


def _raised_text(node: ast.Raise) -> str:
    """The literal text of a `raise UserError(...)` message (f-string parts included, placeholders dropped)."""
    return "".join(c.value for c in ast.walk(node.exc) if isinstance(c, ast.Constant) and isinstance(c.value, str))


def test_library_errors_name_no_flags():
    """No UserError raised in the library names a CLI flag (a whole `pipeline ...` command in backticks, which
    says what to run, may)."""
    found = []
    for path in LIBRARY:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                    and getattr(node.exc.func, "id", None) == "UserError":
                text = re.sub(r"`[^`]*`", "", _raised_text(node))
                if re.search(r"--[a-z]", text):
                    found.append(f"{path.name}:{node.lineno}")
    assert not found, f"UserError messages naming a CLI flag: {found}"
