"""Reading documents from files and folders, and the built-in default corpus.

One document per file for ``.txt``, ``.md`` and ``.py``; one per line for ``.jsonl`` and one
per row for ``.parquet`` (the ``text`` field, or the one named). Any but Parquet may be gzipped
(``.txt.gz`` ...); Parquet files are read one row group at a time.
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
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
TEXT_FIELD = "text"


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
        if root.name.endswith(".parquet.gz"):
            raise ValueError(f"input file {root}: Parquet files cannot be gzipped (Parquet compresses its own "
                             "columns): pass the .parquet file")
        if root.is_file():
            if _base_suffix(root) not in SUFFIXES:
                raise ValueError(f"input file {root} is not one of {', '.join(SUFFIXES)} (optionally .gz)")
            files.append(root)
            continue
        for path in sorted(root.rglob("*")):
            skip = {"site-packages", "dist-packages", "__pycache__"} & set(path.relative_to(root).parts)
            if path.is_file() and not skip and _base_suffix(path) in SUFFIXES and not path.name.endswith(".parquet.gz"):
                files.append(path)
    if not files:
        raise FileNotFoundError(f"no {', '.join(SUFFIXES)} files under {', '.join(map(str, inputs))}")
    return files


def _read_text(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def _parquet_documents(path: Path, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError types
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    if field not in table.schema_arrow.names:
        raise ValueError(f"{path}: no {field!r} column (columns: {', '.join(table.schema_arrow.names)}); "
                         "name the text column with --text-field")
    row = 0
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{path}: row {row} of {field!r} is {type(text).__name__}, not text")
            if text:
                yield Document(f"{path}:{row}", text)
            row += 1


def read_documents(path: Path, field: str = TEXT_FIELD) -> list[Document]:
    if _base_suffix(path) == ".parquet":
        return list(_parquet_documents(path, field))
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
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{path}:{number}: a .jsonl line needs a string {field!r} field")
        if record[field]:
            docs.append(Document(f"{path}:{number}", record[field]))
    return docs


def iter_documents(files: list[Path], field: str = TEXT_FIELD) -> Iterator[Document]:
    for path in files:
        if _base_suffix(path) == ".parquet":
            yield from _parquet_documents(path, field)
        else:
            yield from read_documents(path, field)


def files_fingerprint(files: list[Path]) -> str:
    """A cheap identity of the inputs (paths, sizes, modification times) for reuse checks."""
    h = hashlib.sha256()
    for path in files:
        stat = path.stat()
        h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class HFDatasetInput:
    """A Hugging Face dataset read as a stream (``datasets.load_dataset(..., streaming=True)``): a Hub
    name, resolved from the local cache or the Hub, or a local dataset folder. Nothing is copied to disk
    beside the shards: OpenWebText never has to fit twice."""
    name: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None

    def _load(self):
        try:
            import datasets
        except ImportError:
            raise ValueError("--hf-dataset needs the datasets library: pip install datasets") from None
        try:
            return datasets.load_dataset(self.name, self.config, split=self.split, revision=self.revision,
                                         streaming=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"cannot open the Hugging Face dataset {self.describe()}: {err}") from None

    def documents(self, field: str = TEXT_FIELD) -> Iterator[Document]:
        stream = self._load()
        for row, record in enumerate(stream):
            text = record.get(field)
            if not isinstance(text, str):
                raise ValueError(f"{self.describe()} row {row}: no string {field!r} field (fields: "
                                 f"{', '.join(record)}); name the text field with --text-field")
            if text:
                yield Document(f"{self.name}:{self.split}:{row}", text)

    def describe(self) -> str:
        return f"{self.name}" + (f" ({self.config})" if self.config else "") + f", split {self.split}"

    def fingerprint(self) -> str:
        """The dataset's identity for reuse checks: its name, config, split and revision, and for a local
        folder its files (paths, sizes, modification times)."""
        local = Path(self.name)
        files = files_fingerprint(sorted(p for p in local.rglob("*") if p.is_file())) if local.is_dir() else ""
        return hashlib.sha256(json.dumps([self.name, self.config, self.split, self.revision, files]).encode()
                              ).hexdigest()
