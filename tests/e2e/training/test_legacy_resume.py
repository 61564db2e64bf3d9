"""The checkpoint written before the package moved into stage folders resumes: steps 4-6 give the
losses the pre-move code logged in the same run (exact resume: ZeRO-2, fp32, one rank)."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.legacy import EXPECTED, copy_legacy
from tests.helpers.training import REPO


def test_pre_move_checkpoint_resumes_to_the_losses_the_old_code_logged(tmp_path):
    fixture = copy_legacy(tmp_path)
    done = subprocess.run([sys.executable, "tests/scripts/resume_legacy.py", str(fixture), str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / EXPECTED['checkpoint']} at step 3" in done.stdout
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("LOSSES ")]
    losses = {int(step): value for step, value in json.loads(line.removeprefix("LOSSES ")).items()}
    assert sorted(losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert losses[step] == pytest.approx(EXPECTED["train_loss"][str(step)], abs=1e-5), step
