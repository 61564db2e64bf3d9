"""Before a save every rank checks the free disk together: a file system that cannot hold another
checkpoint the size of the last one stops the save with one clear message."""
import shutil

import pytest

from pgm_dist.checkpoints.format import MARKER
from pgm_dist.checkpoints.saver import CheckpointSpaceError, check_free_space, checkpoint_bytes
from pgm_dist.common.distributed import DistEnv

ENV = DistEnv(0, 0, 1)


def _checkpoint(root, step: int, sizes: dict[str, int], complete: bool = True):
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    for name, size in sizes.items():
        with open(folder / name, "wb") as f:
            f.truncate(size)  # sparse: the apparent size is what a real checkpoint would take
    if complete:
        (folder / MARKER).write_text(f"{step}\n")


def test_checkpoint_bytes_is_the_newest_complete_checkpoints_size(tmp_path):
    assert checkpoint_bytes(tmp_path) is None
    _checkpoint(tmp_path, 3, {"a.pt": 1000, "b.pt": 24})
    _checkpoint(tmp_path, 6, {"a.pt": 5000})
    _checkpoint(tmp_path, 9, {"a.pt": 10**9}, complete=False)  # an interrupted save does not count
    assert checkpoint_bytes(tmp_path) == 5000 + len("6\n")


def test_the_first_save_and_a_roomy_disk_pass(tmp_path):
    check_free_space(tmp_path / "new", ENV)
    _checkpoint(tmp_path, 3, {"a.pt": 1000})
    check_free_space(tmp_path, ENV)


def test_a_disk_too_small_for_another_checkpoint_stops_with_a_clear_message(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    _checkpoint(tmp_path, 3, {"a.pt": free})  # another one this size does not fit
    with pytest.raises(CheckpointSpaceError, match=r"not enough free disk to save a checkpoint under .* \(rank 0: "
                                                   r".* GiB free, the last checkpoint took .* GiB\): free space "
                                                   r"there or lower --keep-last"):
        check_free_space(tmp_path, ENV)
