"""Which code a run ran: the git commit of the checkout pgm_dist is imported from, and whether the
tree had changes; a restart under other code is worth a warning."""
from __future__ import annotations

import subprocess
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def code_version(root: Path = PACKAGE_ROOT, timeout_s: float = 10) -> dict | None:
    """``{"commit": sha, "dirty": bool}`` of the git checkout at ``root`` (tracked files only);
    None outside a checkout or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=timeout_s).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def code_change(before: dict | None, now: dict | None) -> str | None:
    """A warning when a restart runs other code than the previous start (None: same, or unknown)."""
    if not before or not now or before == now:
        return None

    def describe(version: dict) -> str:
        return version["commit"][:12] + (" with uncommitted changes" if version["dirty"] else "")

    return (f"warning: this run's code changed since its previous start ({describe(before)} -> {describe(now)}); "
            "its checkpoints resume, but its numbers may not compare")
