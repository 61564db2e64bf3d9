import warnings
from pathlib import Path

import numpy as np
import pytest

from pgm_dist.common.errors import DataError
from pgm_dist.data.loader import TrainLoader, ValidationLoader
from pgm_dist.data.shards import write_shard

L, PER_SHARD, SHARDS = 16, 6, 8


def _write_shards(folder: Path, shards: int = SHARDS, prefix: str = "train") -> list[int]:
    """Synthetic shards; token 1 of every sample holds its unique id."""
    folder.mkdir(exist_ok=True)
    ids = []
    for s in range(shards):
        samples = []
        for i in range(PER_SHARD):
            uid = s * PER_SHARD + i
            tokens = np.full(L, 7, dtype=np.uint16)
            tokens[1] = uid
            samples.append((f"{uid:06d}", tokens))
            ids.append(uid)
        write_shard(folder / f"{prefix}-{s:06d}.tar", samples)
    return ids


@pytest.fixture
def shards(tmp_path):
    ids = _write_shards(tmp_path)
    return str(tmp_path / "train-*.tar"), ids


def _loader(pattern, rank=0, world=2, workers=2, seed=0, micro_batch=3):
    return TrainLoader(pattern, seq_len=L, micro_batch=micro_batch, rank=rank, world_size=world,
                       num_workers=workers, seed=seed, shuffle_shards=2, samples_per_shard=PER_SHARD)


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch[:, 1].tolist())
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(shards):
    pattern, ids = shards
    per_rank = SHARDS * PER_SHARD // 2 // 3  # one epoch's worth of batches of 3
    seen = []
    for rank in range(2):
        batches = _take(_loader(pattern, rank=rank), per_rank)
        assert all(len(b) == 3 for b in batches)
        seen += [uid for b in batches for uid in b]
    assert sorted(seen) == ids


def test_same_seed_same_order_other_seed_other_order(shards):
    pattern, _ = shards
    first = _take(_loader(pattern, seed=5), 10)
    assert _take(_loader(pattern, seed=5), 10) == first
    assert _take(_loader(pattern, seed=6), 10) != first


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_with_the_next_batch(shards, workers):
    pattern, _ = shards
    total, k = 20, 5  # crosses an epoch; k odd, so the resumed loader must rotate its workers
    uninterrupted = _take(_loader(pattern, rank=1, workers=workers), total)
    first = _loader(pattern, rank=1, workers=workers)
    head = _take(first, k)
    state = first.state_dict()
    resumed = _loader(pattern, rank=1, workers=workers)
    resumed.load_state_dict(state)
    assert head + _take(resumed, total - k) == uninterrupted


def test_resume_at_another_world_size_starts_a_fresh_epoch(shards):
    pattern, ids = shards
    old = _loader(pattern, rank=0, world=2)
    _take(old, 3)
    new = _loader(pattern, rank=0, world=1, workers=2)
    with pytest.warns(UserWarning, match="fresh shuffle at epoch 1"):
        new.load_state_dict(old.state_dict())
    batches = _take(new, SHARDS * PER_SHARD // 3)  # one whole epoch on one rank
    assert sorted(uid for b in batches for uid in b) == ids


@pytest.mark.parametrize("cut", ["at_member_boundary", "inside_a_member"])
def test_truncated_shard_is_skipped_and_counted_once(shards, tmp_path, cut):
    pattern, ids = shards
    victim = tmp_path / "train-000003.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: 5 * 1024] if cut == "at_member_boundary" else data[: 5 * 1024 + 600])
    loader = _loader(pattern, world=1, workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = _take(loader, 3 * (SHARDS - 1) * PER_SHARD // 3)  # three epochs' worth
    seen = {uid for b in batches for uid in b}
    assert seen == set(ids) - set(range(3 * PER_SHARD, 4 * PER_SHARD))
    assert loader.skipped_shards == 1
    assert loader.state_dict()["skipped"] == [str(victim)]


def test_clear_errors(tmp_path, shards):
    pattern, _ = shards
    with pytest.raises(DataError, match="no shard matches"):
        TrainLoader(str(tmp_path / "nothing-*.tar"), seq_len=L, micro_batch=2)
    with pytest.raises(DataError, match="at least 12 are needed"):
        _loader(pattern, world=3, workers=4)
    with pytest.raises(DataError, match="does not exist"):
        TrainLoader(str(tmp_path / "train-{000000..000009}.tar"), seq_len=L, micro_batch=2)
    wrong = TrainLoader(pattern, seq_len=L + 1, micro_batch=2, num_workers=0)
    with pytest.raises(DataError, match="no readable sample"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        next(iter(wrong))


def test_brace_patterns_and_pipe_sources(shards, tmp_path):
    pattern, _ = shards
    braces = str(tmp_path / "train-{000000..000007}.tar")
    piped = [f"pipe:cat {tmp_path / f'train-{s:06d}.tar'}" for s in range(SHARDS)]
    a = _take(_loader(braces, world=1, workers=0), 4)
    assert a == _take(_loader(pattern, world=1, workers=0), 4)
    assert a == _take(_loader(piped, world=1, workers=0), 4)


def test_validation_is_deterministic_and_split_across_ranks(tmp_path):
    ids = _write_shards(tmp_path, shards=3, prefix="val")
    pattern = str(tmp_path / "val-*.tar")
    per_rank = [[uid for b in ValidationLoader(pattern, seq_len=L, micro_batch=4, rank=r, world_size=2)
                 for uid in b[:, 1].tolist()] for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == ids
    assert not set(per_rank[0]) & set(per_rank[1])
    again = [uid for b in ValidationLoader(pattern, seq_len=L, micro_batch=4, rank=0, world_size=2)
             for uid in b[:, 1].tolist()]
    assert again == per_rank[0]
    limited = list(ValidationLoader(pattern, seq_len=L, micro_batch=4, max_batches=2))
    assert len(limited) == 2
