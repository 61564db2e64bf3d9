"""Run folders get no group or world write, whatever the shell's umask (a checkpoint holds pickles)."""
import subprocess
import sys

_PROBE = """
import os, sys
os.umask(int(sys.argv[2], 8))
from pgm_dist.common.files import no_group_or_world_write
no_group_or_world_write()
os.makedirs(sys.argv[1] + "/run/checkpoints")
open(sys.argv[1] + "/run/checkpoints/f", "w").close()
"""


def _modes(tmp_path, umask: str) -> tuple[int, int]:
    subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path), umask], check=True, timeout=60)
    return ((tmp_path / "run" / "checkpoints").stat().st_mode & 0o777,
            (tmp_path / "run" / "checkpoints" / "f").stat().st_mode & 0o777)


def test_a_permissive_umask_loses_group_and_world_write(tmp_path):
    assert _modes(tmp_path, "000") == (0o755, 0o644)


def test_a_stricter_umask_stays(tmp_path):
    assert _modes(tmp_path, "077") == (0o700, 0o600)
