"""What the launcher checks before submitting, against a real (small) data folder."""
import pytest
import torch

from pgm_dist.common.errors import DataError
from pgm_dist.training.config import TrainConfig
from pgm_dist.training.setup import check_before_launch
from tests.helpers.training import REPO

CPU = torch.device("cpu")


def _cfg(small_data, **options) -> TrainConfig:
    return TrainConfig(ds_config=str(REPO / "ds_configs" / "zero2.json"), data=str(small_data), global_batch=16,
                       micro_batch=4, **options)


def test_enough_shards_for_the_largest_world_size_passes(small_data):
    check_before_launch(_cfg(small_data, loader_workers=2), [1, 2], CPU)  # 4 train shards >= 2 x 2


@pytest.mark.parametrize("sizes, workers, global_batch, message", [
    ([4], 2, 16, "the job may get 4 ranks x 2 loader workers, which need at least 8"),
    ([1, 2, 4, 8], 0, 32, "the job may get 8 ranks x 1 loader workers, which need at least 8"),  # 0: in-process
])
def test_too_few_shards_for_the_largest_world_size_is_refused(small_data, sizes, workers, global_batch, message):
    cfg = TrainConfig(ds_config=str(REPO / "ds_configs" / "zero2.json"), data=str(small_data),
                      global_batch=global_batch, micro_batch=4, loader_workers=workers)
    with pytest.raises(DataError, match="has 4 train shards; " + message):
        check_before_launch(cfg, sizes, CPU)


def test_explicit_train_shards_are_not_counted_here(small_data):
    check_before_launch(_cfg(small_data, loader_workers=2, train_shards=str(small_data / "train-000000.tar")),
                        [4], CPU)
