"""TensorBoard writing from one rank; every other rank gets a writer that does nothing."""
from __future__ import annotations

import math
import re
from pathlib import Path

TOKENS_DIR = "by_tokens"  # the token-axis event files, a folder (a TensorBoard run) inside the step axis's
TOKENS_PREFIX = "by_tokens/"  # its tags: ``by_tokens/train/loss`` beside the step axis's ``train/loss``


# The charts TensorBoard's Custom Scalars tab shows first (one card per chart, several tags on one).
OVERVIEW_LAYOUT = {"Overview": {
    "loss: train and validation (nats/token)": ["Multiline", ["train/loss", "val/nelbo"]],
    "learning rate": ["Multiline", ["train/lr"]],
    "tokens/s": ["Multiline", ["perf/tokens_per_s"]],
    "MFU (GPU)": ["Multiline", ["perf/mfu"]],
    "share of the step waiting for data": ["Multiline", ["perf/data_wait_frac"]],
    "restarts and world size": ["Multiline", ["run/restarts", "run/world_size"]],
}}


def verbatim(text: str) -> str:
    """Markdown that TensorBoard's text plugin shows exactly as ``text`` (indentation, line breaks,
    ``_`` and ``*`` kept): a fenced code block, its fence longer than any run of backticks inside."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


class NullWriter:
    """What ranks other than 0 hold, so the loop needs no ``if rank == 0``."""

    def scalars(self, values: dict, step: int, tokens: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def image(self, tag: str, picture, step: int) -> None:
        """picture: uint8 [H, W, 3]."""

    def close(self) -> None:
        pass


class TensorBoardWriter(NullWriter):
    """Scalars against the optimizer step in ``log_dir``, and again against tokens seen (which
    survives a change of world size or global batch) under ``by_tokens/`` tags in
    ``log_dir/by_tokens``.

    A resumed run drops the events a crashed run wrote past its checkpoint, so curves do not
    fold back: TensorBoard's purge (``purge_step``) removes every event of an event-file folder
    at or past a value *whatever its tag*, so each x-axis has its own folder and its own purge
    value (``resumed_step + 1`` and ``resumed_tokens + 1``); one folder would lose the whole
    token axis (token counts exceed any step) at every resume.
    """

    def __init__(self, log_dir: Path, resumed_step: int = 0, resumed_tokens: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        resumed = resumed_step > 0
        self.by_step = SummaryWriter(log_dir=str(self.log_dir), purge_step=resumed_step + 1 if resumed else None)
        self.by_tokens = SummaryWriter(log_dir=str(self.log_dir / TOKENS_DIR),
                                       purge_step=resumed_tokens + 1 if resumed else None)
        self.by_step.add_custom_scalars(OVERVIEW_LAYOUT)

    def scalars(self, values: dict, step: int, tokens: int) -> None:
        for tag, value in values.items():
            if value is None or not math.isfinite(value):
                continue
            self.by_step.add_scalar(tag, value, step)
            self.by_tokens.add_scalar(TOKENS_PREFIX + tag, value, tokens)
        self.by_step.flush()
        self.by_tokens.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        """``text`` as written (samples keep their indentation; see :func:`verbatim`)."""
        self.by_step.add_text(tag, verbatim(text), step)
        self.by_step.flush()

    def image(self, tag: str, picture, step: int) -> None:
        self.by_step.add_image(tag, picture, step, dataformats="HWC")
        self.by_step.flush()

    def close(self) -> None:
        self.by_step.close()
        self.by_tokens.close()


def make_writer(is_main: bool, log_dir: Path, resumed_step: int = 0, resumed_tokens: int = 0) -> NullWriter:
    """``resumed_step`` / ``resumed_tokens``: where the checkpoint a run resumed from stands
    (0 for a fresh run); events past them are dropped on each axis."""
    return TensorBoardWriter(log_dir, resumed_step, resumed_tokens) if is_main else NullWriter()
