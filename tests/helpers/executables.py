"""Real executables for tests of code that runs SLURM's commands: a shell script on PATH that
answers as the command would (prints, fails, hangs)."""
from pathlib import Path


def install(folder: Path, name: str, body: str) -> Path:
    """``folder/name``, an executable ``#!/bin/sh`` script running ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script
