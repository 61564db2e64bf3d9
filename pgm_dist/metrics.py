"""TensorBoard writing from one rank; every other rank gets a writer that does nothing."""
from __future__ import annotations

import math
from pathlib import Path


class NullWriter:
    """What ranks other than 0 hold, so the loop needs no ``if rank == 0``."""

    def scalars(self, values: dict, step: int, tokens: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter(NullWriter):
    """Scalars against the optimizer step, and again under ``by_tokens/`` against tokens seen
    (which survives a change of world size). ``purge_step`` drops events a crashed run wrote
    past its last checkpoint, so resumed curves do not fold back."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict, step: int, tokens: int) -> None:
        for tag, value in values.items():
            if value is None or not math.isfinite(value):
                continue
            self.writer.add_scalar(tag, value, step)
            self.writer.add_scalar(f"by_tokens/{tag}", value, tokens)
        self.writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_writer(is_main: bool, log_dir: Path, purge_step: int | None = None) -> NullWriter:
    return TensorBoardWriter(log_dir, purge_step) if is_main else NullWriter()
