"""What the ``argparse`` command lines of pgm_dist share."""
from __future__ import annotations

import argparse


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
