"""tools/mds_to_indexed.py: exact round trip of ProLong MDS shards, masks, filters, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_prolong.data.indexed import DataError, TokenStore
from tests.data._fixtures import outputs_like, random_docs, write_packed_mds

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import mds_to_indexed  # noqa: E402


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
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "mds_to_indexed.py"), "--input",
                           str(tmp_path / "missing"), "--output-prefix", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert "missing" in proc.stderr and "Traceback" not in proc.stderr
