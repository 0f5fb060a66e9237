"""Gather a corpus of Python source files and split it into train and validation by file.

Embedded default (``corpus.sources == []``): the ``.py`` files of the installed ``torch`` package first (the
original study trained on PyTorch's own Python code), then the standard library's, until ``corpus.max_mb``
MB are taken. Otherwise the named folders, in the given order.

Deterministic: each source's ``.py`` files are taken in sorted order of their relative paths; ``os.walk``
never follows symlinks. Files that are not valid UTF-8, binary (contain NUL), empty, exact duplicates of a
file already taken, or above ``corpus.max_file_kb`` are skipped and recorded in the manifest, and so are the
rare files containing U+2581, the character SentencePiece uses for a space (they would not round-trip).

The split is by file: a file goes to validation when the stable hash of ``<source>/<relative path>`` falls
below ``corpus.val_fraction``, so adding or removing a file never moves another. Each split gets at least one
file.

Output folder: ``train.txt`` and ``val.txt`` (the files of the split concatenated, separated by one NUL,
which no taken file contains) and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path


from attnlab.core.progress import progress_bar
from attnlab.core.errors import ConfigError
from attnlab.core.io import atomic_dir, write_bytes, write_json
from attnlab.core.params import CorpusConfig

SPLITS = ("train", "val")
DOC_SEPARATOR = "\x00"  # between files in train.txt / val.txt; files containing NUL are skipped as binary
MB = 1_000_000
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# SentencePiece writes a space as U+2581 and decodes U+2581 back to a space; a file that contains the
# character itself could not round-trip through the tokenizer, so it is skipped.
SPACE_MARKER = "\u2581"


@dataclass(frozen=True)
class Source:
    name: str  # prefix of every relative path from this source ("torch", "stdlib", or the folder's name)
    root: Path


@dataclass(frozen=True)
class CorpusFile:
    path: str  # "<source>/<relative path>", posix separators
    source: str
    text: str
    bytes: int  # UTF-8 size
    split: str = "train"


# ------------------------------------------------------------------------------------------------ sources


def default_sources() -> list[Source]:
    """The installed torch package's folder, then the standard library's."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("corpus.sources", "[] means the installed torch package, but torch is not installed")
    torch_dir = Path(list(spec.submodule_search_locations)[0])
    stdlib_dir = Path(sysconfig.get_paths()["stdlib"])
    return [Source("torch", torch_dir), Source("stdlib", stdlib_dir)]


def resolve_sources(cfg: CorpusConfig) -> list[Source]:
    """The sources named in the config (folder names made unique), or the embedded default."""
    if not cfg.sources:
        return default_sources()
    sources, seen = [], set()
    for i, folder in enumerate(cfg.sources):
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():  # also checked by config validation; the folder may vanish in between
            raise ConfigError(f"corpus.sources[{i}]", f"folder {folder!r} does not exist")
        name = root.name or "root"
        if name in seen:
            name = f"{name}-{i}"
        seen.add(name)
        sources.append(Source(name, root))
    return sources


def package_versions() -> dict:
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {"torch": torch_version, "python": platform.python_version()}


def python_files(root: Path) -> list[str]:
    """Relative posix paths of the .py files under root, sorted; symlinked folders are not entered."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    return sorted(found)


def sources_fingerprint(cfg: CorpusConfig) -> dict:
    """What the corpus stage would read, cheaply: per source its root, the number of .py files and a hash of
    their relative paths, sizes and modification times (no file is read); the torch and Python versions.

    The `sources` stage writes it on every `dvc repro` (it is always_changed) and `corpus` depends on the file,
    so an edit in a named folder, an upgraded torch or another Python reruns the corpus, and nothing else does.
    """
    entries = []
    for source in resolve_sources(cfg):
        digest = hashlib.sha256()
        files = python_files(source.root)
        for rel in files:
            st = (source.root / rel).stat(follow_symlinks=False)
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
        entries.append({"name": source.name, "root": str(source.root), "py_files": len(files),
                        "digest": digest.hexdigest()})
    return {"packages": package_versions(), "sources": entries}


# ------------------------------------------------------------------------------------------------ gathering


def check_file(path: Path, max_file_kb: int) -> tuple[str | None, str | None]:
    """(text, None) for a usable file, (None, reason) otherwise. Duplicates are checked by the caller."""
    if path.is_symlink():
        return None, "symlink (not followed)"
    try:
        size = path.stat().st_size
        if size > max_file_kb * 1024:
            return None, f"larger than corpus.max_file_kb={max_file_kb} ({size} bytes)"
        raw = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    if b"\x00" in raw:
        return None, "binary (contains NUL)"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte {exc.start})"
    if not text.strip():
        return None, "empty"
    if SPACE_MARKER in text:
        return None, "contains U+2581, SentencePiece's space marker (would not round-trip)"
    return text, None


def gather(sources: list[Source], max_mb: float, max_file_kb: int) -> tuple[list[CorpusFile], list[dict]]:
    """Take files source by source, in sorted path order, until max_mb MB are taken."""
    budget = int(max_mb * MB)
    taken: list[CorpusFile] = []
    skipped: list[dict] = []
    first_by_hash: dict[str, str] = {}
    total = 0
    with progress_bar(total=budget, unit="B", unit_scale=True, desc="corpus", leave=False) as bar:
        for source in sources:
            for rel in python_files(source.root):
                if total >= budget:
                    return taken, skipped
                path = f"{source.name}/{rel}"
                text, reason = check_file(source.root / rel, max_file_kb)
                if text is not None:
                    data = text.encode("utf-8")
                    digest = hashlib.sha256(data).hexdigest()
                    if digest in first_by_hash:
                        text, reason = None, f"duplicate of {first_by_hash[digest]}"
                    else:
                        first_by_hash[digest] = path
                if text is None:
                    skipped.append({"path": path, "reason": reason})
                    continue
                taken.append(CorpusFile(path, source.name, text, len(data)))
                total += len(data)
                bar.update(min(len(data), budget - bar.n))
    return taken, skipped


# ------------------------------------------------------------------------------------------------ splitting


def path_hash(path: str) -> float:
    """A stable number in [0, 1) from the path (sha1), independent of every other file."""
    return int(hashlib.sha1(path.encode("utf-8")).hexdigest()[:15], 16) / 16**15


def assign_splits(files: list[CorpusFile], val_fraction: float) -> list[CorpusFile]:
    """Split by path hash; if a split is empty, move the file nearest the threshold into it."""
    if len(files) < 2:
        raise ConfigError(
            "corpus.sources",
            f"found {len(files)} usable .py file(s); at least 2 are needed to give train and val one each "
            "(see the skipped files in the log, or point corpus.sources at more source)",
        )
    hashes = [path_hash(f.path) for f in files]
    splits = ["val" if h < val_fraction else "train" for h in hashes]
    if "val" not in splits:
        splits[min(range(len(files)), key=hashes.__getitem__)] = "val"
    if "train" not in splits:
        splits[max(range(len(files)), key=hashes.__getitem__)] = "train"
    return [CorpusFile(f.path, f.source, f.text, f.bytes, split) for f, split in zip(files, splits)]


# ------------------------------------------------------------------------------------------------ the stage


def build_corpus(cfg: CorpusConfig, out_dir: str | Path, fingerprint: dict | None = None) -> dict:
    """Gather, split and write the corpus folder atomically. Returns the manifest, which keeps the sources'
    fingerprint (see `sources_fingerprint`) the corpus was built from, when given."""
    start = time.perf_counter()
    sources = resolve_sources(cfg)
    taken, skipped = gather(sources, cfg.max_mb, cfg.max_file_kb)
    files = assign_splits(taken, cfg.val_fraction)
    totals = {
        split: {
            "files": sum(f.split == split for f in files),
            "bytes": sum(f.bytes for f in files if f.split == split),
        }
        for split in SPLITS
    }
    manifest = {
        "sources": [{"name": s.name, "root": str(s.root)} for s in sources],
        "packages": package_versions(),
        "sources_fingerprint": fingerprint,
        "max_mb": cfg.max_mb,
        "val_fraction": cfg.val_fraction,
        "max_file_kb": cfg.max_file_kb,
        "totals": {**totals, "skipped": len(skipped)},
        "files": [{"path": f.path, "source": f.source, "bytes": f.bytes, "split": f.split} for f in files],
        "skipped": skipped,
    }
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            text = DOC_SEPARATOR.join(f.text for f in files if f.split == split)
            write_bytes(tmp / f"{split}.txt", text.encode("utf-8"))
        write_json(tmp / "manifest.json", manifest)
    manifest["seconds"] = time.perf_counter() - start
    return manifest


def read_documents(corpus_dir: str | Path, split: str) -> list[str]:
    """The files of one split, in manifest order, as strings."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(corpus_dir) / f"{split}.txt"
    if not path.exists():
        raise ConfigError(str(path), "corpus split not found: run the corpus stage first (dvc repro corpus)")
    text = path.read_bytes().decode("utf-8")
    return text.split(DOC_SEPARATOR) if text else []
