"""`pipeline report` never loses output: it refuses when there is nothing to report, builds into a temporary
folder that is swapped in only when complete, and needs --force to replace a report with fewer filled cells."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import report as rp
from tests.test_report import REPO, make_cache, write_fit


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One synthetic CIFAR-10-LT cache with three fits, and its report (tables and figures)."""
    base = tmp_path_factory.mktemp("safety")
    root = base / "cache"
    d = make_cache(root, "cifar10-lt", 100, bn=False, n_max=120, dim=6)
    for head, tau in (("softmax", 0.0), ("ncm", 0.0), ("learned-ncm", 0.0)):
        write_fit(d, head, tau=tau)
    out = base / "reports"
    rp.build_report(str(root), out, tsne_per_class=30)
    return dict(root=root, out=out, run=d.name)


def _copy_report(small, tmp_path) -> Path:
    out = tmp_path / "reports"
    shutil.copytree(small["out"], out)
    return out


def test_empty_cache_root_refuses_and_keeps_the_report(small, tmp_path):
    """Today's worst failure: a typo'd --cache-root (an existing folder, no caches) wiped every figure and
    rewrote every table as "not run", exit status 0."""
    out = _copy_report(small, tmp_path)
    before = snapshot(out)
    assert any(k.startswith("figures/") and k.endswith(".png") for k in before)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("report", "--cache-root", str(empty), "--out", str(out))
    assert r.returncode != 0
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "nothing to report" in lines[0], lines
    assert "Traceback" not in r.stderr
    assert snapshot(out) == before
    with pytest.raises(rp.UserError, match="nothing to report"):
        rp.build_report(str(empty), out, force=True)  # --force replaces smaller reports, never with nothing
    assert snapshot(out) == before


def test_fewer_filled_cells_needs_force(small, tmp_path):
    out = _copy_report(small, tmp_path)
    before = snapshot(out)
    # the same cache, but only one of its three fits
    root = tmp_path / "cache"
    shutil.copytree(small["root"], root)
    res = root / small["run"] / "results.csv"
    lines = res.read_text().splitlines(keepends=True)
    res.write_text(lines[0] + "".join(l for l in lines[1:] if ",softmax," in l))
    r = run_cli("report", "--cache-root", str(root), "--out", str(out), "--no-figures")
    assert r.returncode == 2, r.stdout + r.stderr
    msg = (r.stdout + r.stderr).strip().splitlines()
    assert len(msg) == 1 and msg[0].startswith("Error: ") and "--force" in msg[0], msg
    assert snapshot(out) == before
    new = rp.build_report(str(root), out, figures=False, force=True)
    assert snapshot(out) != before
    assert new.filled < rp.filled_cells_on_disk(small["out"])
    assert rp.filled_cells_on_disk(out) == new.filled


def test_a_failing_build_leaves_the_old_report(small, tmp_path, monkeypatch):
    out = _copy_report(small, tmp_path)
    before = snapshot(out)
    root = tmp_path / "cache"
    shutil.copytree(small["root"], root)
    write_fit(root / small["run"], "multi-ncm")  # more cells: the tables would change

    def boom(*a, **k):
        raise RuntimeError("simulated crash while writing the README")
    monkeypatch.setattr(rp, "build_readme", boom)
    with pytest.raises(RuntimeError):
        rp.build_report(str(root), out, figures=False, force=True)
    assert snapshot(out) == before  # not one table was replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "reports"]  # no temporary folder left


def test_out_folder_with_other_files_is_refused(small, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(rp.UserError, match="notes.txt"):
        rp.build_report(str(small["root"]), out, figures=False)
    assert snapshot(out) == {"notes.txt": b"my notes"}


def test_report_swaps_in_a_complete_folder(small, tmp_path):
    out = _copy_report(small, tmp_path)
    (out / "figures" / "fig9_gone.png").write_bytes(b"stale")  # a figure an older version drew
    with pytest.raises(rp.UserError, match="would draw 5 figures, the one in .* has 6"):
        rp.build_report(str(small["root"]), out, tsne_per_class=30)
    rp.build_report(str(small["root"]), out, tsne_per_class=30, force=True)
    after = snapshot(out)
    assert "figures/fig9_gone.png" not in after
    assert {k: v for k, v in after.items()} == snapshot(small["out"])


def test_no_figures_does_not_drop_the_figures_without_force(small, tmp_path):
    """--no-figures used to leave figures/ alone; the new report replaces the whole folder, so dropping the
    figures it has needs --force."""
    out = _copy_report(small, tmp_path)
    before = snapshot(out)
    with pytest.raises(rp.UserError, match="force=True"):
        rp.build_report(str(small["root"]), out, figures=False)
    assert snapshot(out) == before
    rp.build_report(str(small["root"]), out, figures=False, force=True)
    assert not (out / "figures").exists()


def test_a_symlinked_out_folder_stays_a_link(small, tmp_path):
    real = _copy_report(small, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(real)
    rp.build_report(str(small["root"]), link, tsne_per_class=30)
    assert link.is_symlink() and snapshot(real) == snapshot(small["out"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "reports"]
