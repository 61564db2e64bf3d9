"""The code a run ran: a real git checkout made in the test, its commit and whether it changed."""
import subprocess

from pgm_dist.common.provenance import code_change, code_version


def _git(root, *args):
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_commit_and_dirty_of_a_checkout(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert code_version(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "untracked.txt").write_text("not code\n")
    assert code_version(tmp_path) == {"commit": head, "dirty": False}  # untracked files do not count
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == {"commit": head, "dirty": True}


def test_no_checkout_no_version(tmp_path):
    assert code_version(tmp_path / "not_a_repo") is None


def test_a_restart_under_other_code_is_a_warning():
    a, b = {"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": True}
    assert code_change(a, dict(a)) is None and code_change(None, a) is None and code_change(a, None) is None
    assert code_change(a, b) == ("warning: this run's code changed since its previous start (aaaaaaaaaaaa -> "
                                 "bbbbbbbbbbbb with uncommitted changes); its checkpoints resume, but its numbers "
                                 "may not compare")
