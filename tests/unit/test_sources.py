"""The sources fingerprint: it moves with any edit, new file or upgrade in the corpus's folders, and only then."""

from __future__ import annotations

import os

from attnlab.core.params import CorpusConfig
from attnlab.data.corpus import sources_fingerprint


def _folder(tmp_path):
    root = tmp_path / "code"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text("x = 1\n")
    (root / "pkg" / "b.py").write_text("y = 2\n")
    (root / "notes.txt").write_text("not python\n")
    return root


def test_the_fingerprint_is_stable_and_moves_with_each_kind_of_change(tmp_path):
    root = _folder(tmp_path)
    cfg = CorpusConfig(sources=(str(root),))
    first = sources_fingerprint(cfg)
    assert sources_fingerprint(cfg) == first
    assert first["sources"][0]["py_files"] == 2 and first["sources"][0]["root"] == str(root.resolve())
    assert set(first["packages"]) == {"torch", "python"}

    (root / "notes.txt").write_text("edited, but not a .py file\n")
    assert sources_fingerprint(cfg) == first

    b = root / "pkg" / "b.py"
    b.write_text("y = 3\n")  # the same size: the modification time tells
    stat = b.stat()
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    edited = sources_fingerprint(cfg)
    assert edited != first

    (root / "pkg" / "c.py").write_text("z = 4\n")
    assert sources_fingerprint(cfg)["sources"][0]["py_files"] == 3


def test_the_default_sources_are_the_installed_torch_then_the_stdlib():
    found = sources_fingerprint(CorpusConfig())
    assert [s["name"] for s in found["sources"]] == ["torch", "stdlib"]
    assert all(s["py_files"] > 100 for s in found["sources"])
