"""utils' writing helpers: atomic files and folders that honour the umask, a lock that leaves no file."""
import os
import stat

import pytest

from pipeline.utils import atomic_dir, atomic_path, current_umask, dir_lock


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask):
        os.umask(mask)
    yield set_
    os.umask(old)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_path_honours_the_umask(tmp_path, umask, mask, want):
    umask(mask)
    assert current_umask() == mask
    with atomic_path(tmp_path / "results.csv", suffix=".csv") as tmp:
        tmp.write_text("a\n")
    assert _mode(tmp_path / "results.csv") == want  # mkstemp alone gives 0600 whatever the umask
    assert os.listdir(tmp_path) == ["results.csv"]


def test_atomic_path_failure_leaves_the_old_file(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            tmp.write_text("new")
            raise RuntimeError("boom")
    assert f.read_text() == "old" and os.listdir(tmp_path) == ["x.txt"]


def test_atomic_dir_swaps_in_a_whole_folder(tmp_path, umask):
    umask(0o022)
    out = tmp_path / "reports"
    out.mkdir()
    (out / "old.md").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.md").write_text("new")
        assert (out / "old.md").exists()  # nothing changes before the swap
    assert sorted(os.listdir(out)) == ["new.md"] and sorted(os.listdir(tmp_path)) == ["reports"]
    assert _mode(out) == 0o755  # mkdtemp alone gives 0700
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.md").write_text("half")
            raise RuntimeError("boom")
    assert sorted(os.listdir(out)) == ["new.md"] and sorted(os.listdir(tmp_path)) == ["reports"]
    fresh = tmp_path / "fresh"
    with atomic_dir(fresh) as tmp:
        (tmp / "a").write_text("a")
    assert os.listdir(fresh) == ["a"]


def test_dir_lock_excludes_and_leaves_no_file(tmp_path):
    import fcntl
    with dir_lock(tmp_path):
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert os.listdir(tmp_path) == []
