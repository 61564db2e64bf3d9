"""Reading documents from files and folders, and the built-in default corpus.

One document per file for ``.txt``, ``.md`` and ``.py``; one per line for ``.jsonl``
(its ``text`` field). Any of them may be gzipped (``.txt.gz`` ...).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = (".txt", ".md", ".py")
SUFFIXES = TEXT_SUFFIXES + (".jsonl",)


@dataclass(frozen=True)
class Document:
    source: str  # "path" or "path:line"
    text: str


def default_corpus_paths() -> list[Path]:
    """The Python standard library's own source folder: present wherever Python is."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def _base_suffix(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix


def list_files(inputs: list[Path]) -> list[Path]:
    """Every readable document file under the inputs, in a stable (sorted) order.

    Installed packages (``site-packages``) below an input folder are left out.
    """
    files: list[Path] = []
    for root in inputs:
        if not root.exists():
            raise FileNotFoundError(f"input path {root} does not exist")
        if root.is_file():
            if _base_suffix(root) not in SUFFIXES:
                raise ValueError(f"input file {root} is not one of {', '.join(SUFFIXES)} (optionally .gz)")
            files.append(root)
            continue
        for path in sorted(root.rglob("*")):
            skip = {"site-packages", "dist-packages", "__pycache__"} & set(path.relative_to(root).parts)
            if path.is_file() and not skip and _base_suffix(path) in SUFFIXES:
                files.append(path)
    if not files:
        raise FileNotFoundError(f"no {', '.join(SUFFIXES)} files under {', '.join(map(str, inputs))}")
    return files


def _read_text(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def read_documents(path: Path) -> list[Document]:
    text = _read_text(path)
    if _base_suffix(path) != ".jsonl":
        return [Document(str(path), text)] if text else []
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number}: a .jsonl line needs a string 'text' field")
        if record["text"]:
            docs.append(Document(f"{path}:{number}", record["text"]))
    return docs


def iter_documents(files: list[Path]) -> Iterator[Document]:
    for path in files:
        yield from read_documents(path)


def files_fingerprint(files: list[Path]) -> str:
    """A cheap identity of the inputs (paths, sizes, modification times) for reuse checks."""
    h = hashlib.sha256()
    for path in files:
        stat = path.stat()
        h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()
