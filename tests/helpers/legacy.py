"""The pre-move fixture (tests/fixtures/v0_1, written by pgm_dist 0.1.0 before the stage-folder
layout by its make.py): a tiny data folder, the step-3 checkpoint of a 6-step run, an export."""
import json
import shutil
from pathlib import Path

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "v0_1"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())


def copy_legacy(tmp_path: Path) -> Path:
    """A writable copy of the fixture (a resume writes beside the checkpoint)."""
    target = tmp_path / "v0_1"
    shutil.copytree(LEGACY, target)
    return target
