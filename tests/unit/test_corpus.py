"""The corpus stage's library: gathering order, skips, the split by file, and its bad-input errors."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from attnlab.core.errors import ConfigError
from attnlab.core.io import read_json
from attnlab.core.params import CorpusConfig
from attnlab.data.corpus import DOC_SEPARATOR, build_corpus, path_hash, python_files, read_documents, resolve_sources

ROOT = Path(__file__).resolve().parents[2]


def write_files(folder: Path, files: dict[str, bytes | str]) -> Path:
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return folder


def good_files(n: int, prefix: str = "pkg/mod") -> dict[str, str]:
    return {f"{prefix}_{i:02d}.py": f"def f_{i}(x):\n    return x + {i}\n" for i in range(n)}


def corpus_config(*folders: Path, **kwargs) -> CorpusConfig:
    return CorpusConfig(sources=tuple(str(f) for f in folders), **kwargs)


def test_two_runs_write_identical_bytes(tmp_path, tiny_corpus):
    cfg = corpus_config(tiny_corpus, max_mb=1)
    build_corpus(cfg, tmp_path / "a")
    build_corpus(cfg, tmp_path / "b")
    for name in ("train.txt", "val.txt", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_files_are_taken_in_sorted_path_order_and_read_back_whole(tmp_path):
    src = write_files(tmp_path / "src", {"b/z.py": "z = 1\n", "a.py": "a = 1\r\n", "b/a.py": "ba = 'é'\n",
                                         "c.py": "c = 3", "c.txt": "not python\n"})
    manifest = build_corpus(corpus_config(src, val_fraction=0.5), tmp_path / "out")
    paths = [f["path"] for f in manifest["files"]]
    assert paths == ["src/a.py", "src/b/a.py", "src/b/z.py", "src/c.py"]  # sorted (not walk order); no .txt
    docs = {split: read_documents(tmp_path / "out", split) for split in ("train", "val")}
    for split in ("train", "val"):
        expected = [(src / f["path"].removeprefix("src/")).read_bytes().decode("utf-8") for f in manifest["files"]
                    if f["split"] == split]
        assert docs[split] == expected
        raw = (tmp_path / "out" / f"{split}.txt").read_bytes()
        assert raw == DOC_SEPARATOR.join(expected).encode("utf-8")
        assert manifest["totals"][split]["bytes"] == sum(len(d.encode("utf-8")) for d in expected)


def test_bad_files_are_skipped_and_recorded(tmp_path):
    files = {
        **good_files(3),
        "pkg/latin1.py": "caf\xe9 = 1\n".encode("latin-1"),
        "pkg/nul.py": b"x = 1\x00\n",
        "pkg/empty.py": b"",
        "pkg/blank.py": b"\n   \n\t\n",
        "pkg/zz_copy.py": good_files(3)["pkg/mod_01.py"],
        "pkg/big.py": "x = 1\n" * 400,  # 2400 bytes > 2 KB
        "pkg/marker.py": "s = 'a\u2581b'\n",
    }
    src = write_files(tmp_path / "src", files)
    (src / "pkg" / "link.py").symlink_to(src / "pkg" / "mod_00.py")
    (src / "pkg" / "loop").symlink_to(src / "pkg", target_is_directory=True)  # never entered
    manifest = build_corpus(corpus_config(src, max_file_kb=2), tmp_path / "out")
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {f"src/pkg/{name}" for name in
                            ("latin1.py", "nul.py", "empty.py", "blank.py", "zz_copy.py", "big.py", "marker.py",
                             "link.py")}
    assert reasons["src/pkg/latin1.py"].startswith("not valid UTF-8")
    assert reasons["src/pkg/nul.py"].startswith("binary")
    assert reasons["src/pkg/empty.py"] == reasons["src/pkg/blank.py"] == "empty"
    assert reasons["src/pkg/zz_copy.py"] == "duplicate of src/pkg/mod_01.py"
    assert "corpus.max_file_kb=2" in reasons["src/pkg/big.py"]
    assert "U+2581" in reasons["src/pkg/marker.py"]
    assert reasons["src/pkg/link.py"].startswith("symlink")
    assert [f["path"] for f in manifest["files"]] == [f"src/pkg/mod_{i:02d}.py" for i in range(3)]
    assert manifest["totals"]["skipped"] == 8


def test_gathering_stops_once_max_mb_is_reached(tmp_path):
    files = {f"m{i:02d}.py": f"# {i}\n" + "x = 1\n" * 1000 for i in range(10)}  # ~6 KB each
    src = write_files(tmp_path / "src", files)
    manifest = build_corpus(corpus_config(src, max_mb=0.02), tmp_path / "out")  # 20 KB
    sizes = [f["bytes"] for f in manifest["files"]]
    assert sum(sizes) >= 20_000 and sum(sizes[:-1]) < 20_000
    assert len(sizes) == 4


def test_sources_are_read_in_the_given_order(tmp_path):
    first = write_files(tmp_path / "zeta", good_files(2, "m"))
    second = write_files(tmp_path / "alpha", {"n.py": "n = 2\n"})
    manifest = build_corpus(corpus_config(first, second), tmp_path / "out")
    assert [f["source"] for f in manifest["files"]] == ["zeta", "zeta", "alpha"]
    assert [s["name"] for s in manifest["sources"]] == ["zeta", "alpha"]


def test_split_is_disjoint_and_follows_the_path_hash(tmp_path):
    src = write_files(tmp_path / "src", good_files(40))
    manifest = build_corpus(corpus_config(src, val_fraction=0.3), tmp_path / "out")
    val = {f["path"] for f in manifest["files"] if f["split"] == "val"}
    train = {f["path"] for f in manifest["files"] if f["split"] == "train"}
    assert val and train and not val & train
    assert len(val | train) == 40
    assert val == {f["path"] for f in manifest["files"] if path_hash(f["path"]) < 0.3}
    assert 4 <= len(val) <= 20  # about 30 %
    assert len(read_documents(tmp_path / "out", "val")) == len(val)
    assert len(read_documents(tmp_path / "out", "train")) == len(train)


def test_adding_a_file_moves_no_other_file(tmp_path):
    src = write_files(tmp_path / "src", good_files(30))
    before = build_corpus(corpus_config(src, val_fraction=0.2), tmp_path / "a")
    write_files(src, {"pkg/added.py": "added = True\n", "aaa_first.py": "first = 1\n"})
    after = build_corpus(corpus_config(src, val_fraction=0.2), tmp_path / "b")
    split_after = {f["path"]: f["split"] for f in after["files"]}
    assert len(split_after) == 32
    for f in before["files"]:
        assert split_after[f["path"]] == f["split"], f["path"]


@pytest.mark.parametrize("val_fraction, starved", [(1e-6, "val"), (0.999999, "train")])
def test_each_split_gets_at_least_one_file(tmp_path, val_fraction, starved):
    src = write_files(tmp_path / "src", good_files(5))
    manifest = build_corpus(corpus_config(src, val_fraction=val_fraction), tmp_path / "out")
    assert manifest["totals"][starved]["files"] == 1
    assert manifest["totals"]["train"]["files"] + manifest["totals"]["val"]["files"] == 5
    assert len(read_documents(tmp_path / "out", starved)) == 1


def test_too_few_usable_files_is_a_config_error_before_writing(tmp_path):
    src = write_files(tmp_path / "src", {"only.py": "x = 1\n", "bad.py": b"\xff\xfe", "empty.py": b""})
    with pytest.raises(ConfigError) as info:
        build_corpus(corpus_config(src), tmp_path / "out")
    assert info.value.key == "corpus.sources"
    assert "1 usable" in info.value.message
    assert not (tmp_path / "out").exists()


def test_corpus_stage_reports_too_few_files_in_one_line(tmp_path):
    src = write_files(tmp_path / "src", {"empty.py": b""})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"corpus": {"sources": [str(src)]}}))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "corpus.py"), "--params", str(params), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: corpus.sources: found 0 usable")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_default_sources_are_torch_then_stdlib_without_site_packages():
    sources = resolve_sources(CorpusConfig())
    assert [s.name for s in sources] == ["torch", "stdlib"]
    assert (sources[0].root / "__init__.py").is_file() and sources[0].root.name == "torch"
    assert sources[1].root == Path(sysconfig.get_paths()["stdlib"])
    stdlib_files = python_files(sources[1].root)
    assert "os.py" in stdlib_files and stdlib_files == sorted(stdlib_files)
    assert not any("site-packages" in p or "dist-packages" in p for p in stdlib_files)


def test_manifest_records_package_versions(tmp_path, tiny_corpus):
    build_corpus(corpus_config(tiny_corpus), tmp_path / "out")
    manifest = read_json(tmp_path / "out" / "manifest.json")
    import torch

    assert manifest["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert manifest["packages"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"path", "source", "bytes", "split"} == set(manifest["files"][0])
