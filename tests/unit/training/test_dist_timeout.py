"""--dist-timeout-min reaches the process group: a collective waits that long for a missing rank."""
import os
import subprocess
import sys

from pgm_dist.common.distributed import free_port
from tests.helpers.training import REPO

_PROBE = """
import torch, torch.distributed as dist
from pgm_dist.common.distributed import init_process_group
init_process_group(torch.device("cpu"), 0.5)
print("TIMEOUT", dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout)
dist.destroy_process_group()
"""


def test_the_process_group_gets_the_timeout():
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TIMEOUT 0:00:30" in done.stdout
