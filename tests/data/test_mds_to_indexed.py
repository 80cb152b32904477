"""tools/mds_to_indexed.py: exact round trip of ProLong MDS shards, masks, filters, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_prolong.data.indexed import TokenStore
from megatron_prolong.tools import mds_to_indexed
from tests.data._fixtures import outputs_like, random_docs, write_packed_mds
from tests.tool_env import tool_env


REPO = Path(__file__).resolve().parents[2]


def _read_all(prefix) -> list[np.ndarray]:
    store = TokenStore(prefix)
    return [np.array(store.doc(d)) for d in range(len(store))]


@pytest.fixture(scope="module")
def mds_two_domains(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("mds")
    docs = {"book-65536": random_docs(rng, 40), "fineweb-edu": random_docs(rng, 25, hi=60)}
    written = write_packed_mds(root / "mixed", docs)
    assert len(list((root / "mixed").glob("shard.*.mds"))) > 2  # several shards
    return root / "mixed", written


@pytest.mark.parametrize("workers", [1, 2])
def test_roundtrip_split_by_domain(mds_two_domains, tmp_path, workers):
    src, written = mds_two_domains
    out = tmp_path / "out" / "prolong"
    assert mds_to_indexed.main(["--input", str(src), "--output-prefix", str(out), "--split-by-domain",
                                "--workers", str(workers), "--quiet"]) == 0
    for domain in ("book-65536", "fineweb-edu"):
        expected = [d for dom, d in written if dom == domain]
        got = _read_all(f"{out}.{domain}")
        assert len(got) == len(expected)
        for g, e in zip(got, expected):  # every document once, in order, exact tokens
            np.testing.assert_array_equal(g, e.astype(np.int64))
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["documents"] == len(written)
    assert summary["tokens"] == sum(len(d) for _, d in written)
    assert sum(summary["domains"]["book-65536"]["length_histogram"].values()) == 40
    # Readable by megatron-core itself, as int32.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(f"{out}.book-65536")
    assert ds.index.dtype == np.int32 and len(ds) == 40
    np.testing.assert_array_equal(ds[3], [d for dom, d in written if dom == "book-65536"][3])


def test_single_output_and_length_filters(mds_two_domains, tmp_path):
    src, written = mds_two_domains
    out = tmp_path / "all"
    assert mds_to_indexed.main(["--input", str(src), "--output-prefix", str(out), "--min-length", "20",
                                "--max-length", "250", "--quiet"]) == 0
    expected = [d for _, d in written if 20 <= len(d) <= 250]
    got = _read_all(out)
    assert [len(g) for g in got] == [len(e) for e in expected]
    assert all(np.array_equal(g, e) for g, e in zip(got, expected))
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    dropped = sum(s["filtered_short"] + s["filtered_long"] for s in summary["domains"].values())
    assert dropped == len(written) - len(expected) > 0


def test_sft_mask_written_aligned(tmp_path):
    rng = np.random.default_rng(1)
    docs = {"ultrachat": random_docs(rng, 12, hi=50)}
    masks = {"ultrachat": [rng.integers(0, 2, size=len(d)).astype(np.uint8) for d in docs["ultrachat"]]}
    write_packed_mds(tmp_path / "sft", docs, masks=masks)
    out = tmp_path / "o" / "uc"
    assert mds_to_indexed.main(["--input", str(tmp_path / "sft"), "--output-prefix", str(out), "--quiet"]) == 0
    got_masks = _read_all(f"{out}_mask")
    assert len(got_masks) == 12
    for g, e in zip(got_masks, masks["ultrachat"]):
        np.testing.assert_array_equal(g, e)


def test_parent_folder_of_domains(tmp_path):
    """ProLong layout: DATA/<domain>/index.json; the folder name is the domain if none is stored."""
    rng = np.random.default_rng(2)
    cols = {"input_ids": "ndarray:uint32", "length": "int"}
    write_packed_mds(tmp_path / "data" / "arxiv", {"x": random_docs(rng, 4)}, docs_per_sample=1, columns=cols)
    write_packed_mds(tmp_path / "data" / "textbooks", {"x": random_docs(rng, 3)}, docs_per_sample=1, columns=cols)
    out = tmp_path / "o" / "p"
    assert mds_to_indexed.main(["--input", str(tmp_path / "data"), "--output-prefix", str(out),
                                "--split-by-domain", "--quiet"]) == 0
    assert len(_read_all(f"{out}.arxiv")) == 4 and len(_read_all(f"{out}.textbooks")) == 3


# ---- bad inputs: clear error naming the file, non-zero exit, nothing complete-looking ------------

def _fails(args, tmp_path, capsys, *needles):
    out = tmp_path / "bad" / "out"
    rc = mds_to_indexed.main([*args, "--output-prefix", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0
    for n in needles:
        assert n in err, err
    assert outputs_like(out) == []
    return err


def test_missing_input(tmp_path, capsys):
    _fails(["--input", str(tmp_path / "nope")], tmp_path, capsys, "nope", "does not exist")


def test_missing_and_corrupt_index_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails(["--input", str(tmp_path / "empty")], tmp_path, capsys, "index.json")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "index.json").write_text("{not json")
    _fails(["--input", str(tmp_path / "corrupt")], tmp_path, capsys, "corrupt", "index.json")


def test_missing_and_corrupt_shard(mds_two_domains, tmp_path, capsys):
    import shutil

    src, _ = mds_two_domains
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    shard = sorted(broken.glob("shard.*.mds"))[1]
    shard.write_bytes(shard.read_bytes()[: 200])  # truncated shard
    _fails(["--input", str(broken), "--split-by-domain"], tmp_path, capsys, shard.name, "corrupt")
    shard.unlink()
    _fails(["--input", str(broken)], tmp_path, capsys, shard.name, "missing")


def test_schema_without_input_ids(tmp_path, capsys):
    from streaming import MDSWriter

    with MDSWriter(out=str(tmp_path / "noids"), columns={"tokens": "ndarray:uint32", "domain": "str"}) as w:
        w.write({"tokens": np.arange(5, dtype=np.uint32), "domain": "d"})
    _fails(["--input", str(tmp_path / "noids")], tmp_path, capsys, "input_ids", "index.json")


def test_tokens_outside_vocab(tmp_path, capsys):
    write_packed_mds(tmp_path / "m", {"d": [np.array([1, 2, 128256], np.uint32), np.array([3], np.uint32)]})
    _fails(["--input", str(tmp_path / "m")], tmp_path, capsys, "128256", "shard.00000.mds", "vocab")
    # a smaller --vocab-size catches smaller ids
    write_packed_mds(tmp_path / "m2", {"d": [np.array([1, 500], np.uint32)]})
    _fails(["--input", str(tmp_path / "m2"), "--vocab-size", "100"], tmp_path, capsys, "500")


def test_empty_domain(tmp_path, capsys):
    rng = np.random.default_rng(4)
    write_packed_mds(tmp_path / "m", {"long": random_docs(rng, 5, lo=100, hi=200),
                                       "short": random_docs(rng, 5, lo=1, hi=10)})
    _fails(["--input", str(tmp_path / "m"), "--split-by-domain", "--min-length", "50"], tmp_path, capsys,
           "short", "no documents")
    write_packed_mds(tmp_path / "e", {"": random_docs(rng, 2)})
    _fails(["--input", str(tmp_path / "e")], tmp_path, capsys, "empty domain")


def test_cli_exit_code(tmp_path):
    """The tool as a process: non-zero exit and a one-line error, no traceback."""
    proc = subprocess.run([sys.executable, "tools/mds_to_indexed.py", "--input",
                           str(tmp_path / "missing"), "--output-prefix", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO, env=tool_env(), timeout=120)
    assert proc.returncode == 1
    assert "missing" in proc.stderr and "Traceback" not in proc.stderr


# ---- compressed shards, ProLong's released layout, naming -----------------------------------------

def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("compression, workers", [(None, 1), ("zstd", 1), ("zstd:7", 2), ("gz", 1),
                                                  ("br", 1), ("snappy", 1), ("bz2", 2)])
def test_compressed_shards_read_directly_exact_and_nothing_left_behind(tmp_path, compression, workers):
    rng = np.random.default_rng(5)
    docs = {"book": random_docs(rng, 30, hi=200), "web": random_docs(rng, 20, hi=40)}
    written = write_packed_mds(tmp_path / "in", docs, compression=compression, size_limit=1 << 11)
    shards = sorted(p.name for p in (tmp_path / "in").glob("shard.*"))
    assert len(shards) > 2 and all(p.endswith(".mds") == (compression is None) for p in shards)
    before = _files(tmp_path / "in")
    out = tmp_path / "out" / "p"
    assert mds_to_indexed.main(["--input", str(tmp_path / "in"), "--output-prefix", str(out), "--split-by",
                                "field", "--workers", str(workers), "--quiet"]) == 0
    for domain in docs:  # every `indices` piece back, exactly, in order
        expected = [d for dom, d in written if dom == domain]
        got = _read_all(f"{out}.{domain}")
        assert len(got) == len(expected) and all(np.array_equal(g, e) for g, e in zip(got, expected))
    assert _files(tmp_path / "in") == before  # no decompressed copy next to the input
    assert _files(tmp_path / "out") == {f"p.{d}.{ext}" for d in docs for ext in ("bin", "idx")} | {"p.summary.json"}


RELEASE = {"book-65536": "book", "book-524288": "book", "thestackv1_concat_by_repo-65536": "thestackv1_concat_by_repo",
           "fineweb-edu": "fineweb-edu"}


@pytest.fixture(scope="module")
def release_root(tmp_path_factory):
    from tests.data._fixtures import write_release_miniature

    rng = np.random.default_rng(6)
    root = tmp_path_factory.mktemp("release") / "long-context-524288"
    docs = {name: random_docs(rng, 9, lo=20, hi=150) for name in RELEASE}
    write_release_miniature(root, RELEASE, docs, compression={"book-65536": "zstd", "fineweb-edu": "gz"},
                            merged={"book-65536", "fineweb-edu"})
    (root / "README.md").write_text("dataset card\n")  # as in a clone of the HF repo
    return root, docs


@pytest.mark.parametrize("flags", [[], ["--split-by-domain"], ["--split-by", "folder", "--workers", "2"]])
def test_release_layout_one_dataset_per_folder_named_after_it(release_root, tmp_path, capsys, flags):
    root, docs = release_root
    assert (root / "book-65536" / "index.json").is_file() and not (root / "book-524288" / "index.json").exists()
    out = tmp_path / "p"
    assert mds_to_indexed.main(["--input", str(root), "--output-prefix", str(out), "--quiet", *flags]) == 0
    for name in RELEASE:  # book-65536 and book-524288 stay apart although both say domain="book"
        got = _read_all(f"{out}.{name}")
        assert len(got) == len(docs[name]) and all(np.array_equal(g, e) for g, e in zip(got, docs[name]))
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["split_by"] == "folder" and set(summary["domains"]) == set(RELEASE)
    book = summary["domains"]["book-524288"]
    assert book["domain_field"] == {"book": 9} and list(book["folders"]) == [str(root / "book-524288")]
    assert book["longest_document"] == max(len(d) for d in docs["book-524288"])
    assert "book-524288: 9 documents" in capsys.readouterr().out


def test_release_layout_parallel_output_is_byte_identical(release_root, tmp_path):
    root, _ = release_root
    for w in (1, 2):
        assert mds_to_indexed.main(["--input", str(root), "--output-prefix", str(tmp_path / f"w{w}"),
                                    "--workers", str(w), "--quiet"]) == 0
    for name in RELEASE:
        for ext in (".bin", ".idx"):
            assert Path(f"{tmp_path}/w1.{name}{ext}").read_bytes() == Path(f"{tmp_path}/w2.{name}{ext}").read_bytes()


def test_split_by_field_merges_folders_and_says_so(release_root, tmp_path, capsys):
    root, docs = release_root
    out = tmp_path / "p"
    assert mds_to_indexed.main(["--input", str(root), "--output-prefix", str(out), "--split-by", "field",
                                "--quiet"]) == 0
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert set(summary["domains"]) == {"book", "thestackv1_concat_by_repo", "fineweb-edu"}
    assert list(summary["domains"]["book"]["folders"]) == [str(root / "book-524288"), str(root / "book-65536")]
    assert len(_read_all(f"{out}.book")) == len(docs["book-65536"]) + len(docs["book-524288"])
    assert "note: book merges 2 folders" in capsys.readouterr().out


def test_a_domain_folder_of_part_folders_is_one_dataset(release_root, tmp_path):
    root, docs = release_root
    out = tmp_path / "books"
    assert mds_to_indexed.main(["--input", str(root / "book-524288"), "--output-prefix", str(out), "--quiet"]) == 0
    got = _read_all(out)
    assert len(got) == len(docs["book-524288"]) and all(np.array_equal(g, e) for g, e in zip(got, docs["book-524288"]))


def test_mixture_filter_and_name_clashes(release_root, tmp_path, capsys):
    root, _ = release_root
    _fails(["--input", str(root), "--mixture", "prolong-64k"], tmp_path, capsys,
           "'textbooks'", "not found in the input")
    # the same folder name from two inputs would silently merge: refused
    other = tmp_path / "copy"
    import shutil

    shutil.copytree(root / "fineweb-edu", other / "fineweb-edu")
    _fails(["--input", str(root), str(other)], tmp_path, capsys, "would both be written", "fineweb-edu")


def test_git_lfs_pointer_instead_of_a_shard(release_root, tmp_path, capsys):
    import shutil

    root, _ = release_root
    clone = tmp_path / "clone"
    shutil.copytree(root / "book-524288", clone)
    shard = sorted(clone.rglob("shard.00000.mds"))[0]
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1234\n")
    _fails(["--input", str(clone)], tmp_path, capsys, "git lfs pull", shard.name)


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_of_growing_size(tmp_path, workers):
    """Shards are read into one reused buffer per process; a bigger shard after a small one grows it."""
    rng = np.random.default_rng(7)
    small = write_packed_mds(tmp_path / "in" / "a", {"a": random_docs(rng, 6, hi=20)}, size_limit=1 << 10)
    big = write_packed_mds(tmp_path / "in" / "b", {"b": random_docs(rng, 6, lo=2000, hi=4000)}, size_limit=1 << 16)
    out = tmp_path / "p"
    assert mds_to_indexed.main(["--input", str(tmp_path / "in"), "--output-prefix", str(out),
                                "--workers", str(workers), "--quiet"]) == 0
    for name, written in (("a", small), ("b", big)):
        got = _read_all(f"{out}.{name}")
        assert len(got) == len(written) and all(np.array_equal(g, e) for (_, e), g in zip(written, got))
