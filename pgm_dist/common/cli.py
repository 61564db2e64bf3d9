"""What the ``argparse`` command lines of pgm_dist share."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from pgm_dist.common.errors import USER_ERRORS


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with ``(default: X)``
    unless the option is required, has no default (None) or is an off switch (False), or
    its help already states the default in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or "(default:" in text or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)"


def default_device() -> str:
    """The ``--device`` default of every command: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_cli(body: Callable[[], int | None]) -> int:
    """A command's body, run so that a user error (:data:`USER_ERRORS`) prints ``error: MESSAGE``
    on stderr and exits with status 2 instead of a traceback; else the body's status (None: 0)."""
    try:
        status = body()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if status is None else status
