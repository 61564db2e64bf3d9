"""Fixtures of the in-process training tests."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from pgm_dist.common.distributed import dist_env, init_process_group
from tests.helpers.training import free_port


@pytest.fixture(scope="session")
def world_of_one():
    """One process group for the whole session: DeepSpeed caches its groups, so it is made once."""
    variables = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    init_process_group(torch.device("cpu"))
    yield dist_env()
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
