"""Resume the pre-move fixture's step-3 checkpoint to its step 6, in one process (a world of one):
``python tests/scripts/resume_legacy.py FIXTURE_COPY OUT``; prints the train losses as JSON."""
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pgm_dist.checkpoints.format import read_state
from pgm_dist.models.config import ModelConfig
from pgm_dist.training.config import TrainConfig
from pgm_dist.training.session import run
from pgm_dist.training.setup import prepare, prepare_process


def main(fixture: Path, out: Path) -> None:
    (checkpoint,) = (fixture / "checkpoint").iterdir()
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
    saved = read_state(checkpoint)
    cfg = replace(TrainConfig(**saved["train_config"]), data=str(fixture / "data"), out=str(out))
    model_config = ModelConfig.from_dict(saved["model_config"])
    setup = prepare_process(cfg, lambda c, env, device: prepare(c, env, device, model_config=model_config))
    run(setup)
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    print("LOSSES " + json.dumps({e.step: e.value for e in events.Scalars("train/loss")}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
