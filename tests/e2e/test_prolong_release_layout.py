"""ProLong's released data, end to end, in miniature: the two HF repos' layout -> the documented
``mds_to_indexed.py`` commands -> ``pretrain_prolong.py`` with the recipe mixtures, nothing renamed,
no blend written by hand."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

from megatron_prolong.data.mixtures import MIXTURES
from tests.data._fixtures import write_release_miniature

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 512  # llama3-debug
# Every folder name of both repos (stage 1's also has dclm-baseline, which no recipe reads).
FOLDERS = sorted(set(MIXTURES["prolong-64k"]) | set(MIXTURES["prolong-512k"]) | {"dclm-baseline"})
IDS_PER_FOLDER = (VOCAB - 1) // len(FOLDERS)


def _id_range(folder: str) -> tuple[int, int]:
    """Token ids of a folder's documents: a range of its own, so every sample shows its source."""
    k = FOLDERS.index(folder)
    return 1 + k * IDS_PER_FOLDER, 1 + (k + 1) * IDS_PER_FOLDER


def _docs(rng, folder: str) -> list[np.ndarray]:
    lo, hi = _id_range(folder)
    n_tokens = {"-524288": (150, 300), "-65536": (70, 140)}.get(folder[folder.rfind("-"):], (5, 60))
    return [rng.integers(lo, hi, size=int(rng.integers(*n_tokens))).astype(np.uint32) for _ in range(8)]


def _field(folder: str) -> str:
    """The samples' `domain` value: `book` for book-65536 and book-524288 alike, as released."""
    return re.sub(r"-(65536|524288)$", "", folder)


@pytest.fixture(scope="module")
def prolong_data(tmp_path_factory):
    """``datasets/long-context-{65536,524288}`` (clones of prolong-data-64K / -512K), converted with
    the commands of docs/data.md."""
    rng = np.random.default_rng(0)
    base = tmp_path_factory.mktemp("prolong")
    repos = {"long-context-65536": [f for f in FOLDERS if f in MIXTURES["prolong-64k"] or f == "dclm-baseline"],
             "long-context-524288": list(MIXTURES["prolong-512k"])}
    for repo, folders in repos.items():
        write_release_miniature(
            base / "datasets" / repo, {f: _field(f) for f in folders}, {f: _docs(rng, f) for f in folders},
            # some folders zstd-compressed (the common MDS setting), some with a merged index.json
            compression={f: "zstd" for f in folders[::2]}, merged=set(folders[1::3]))
    from megatron_prolong.tools import mds_to_indexed  # the tool's main(), in this process: saves a start-up

    for repo, mixture, workers in (("long-context-65536", "prolong-64k", 2), ("long-context-524288", "prolong-512k", 1)):
        assert mds_to_indexed.main(["--input", str(base / "datasets" / repo), "--output-prefix",
                                    str(base / "data" / repo), "--mixture", mixture, "--vocab-size", str(VOCAB),
                                    "--workers", str(workers), "--quiet"]) == 0
    return base


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _share_table(stdout: str) -> dict[str, tuple[float, float, int]]:
    """{dataset: (requested, effective, samples)} from the table the data build prints."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"\[data\]\s+(\S+)\s+([\d.]+)%\s+([\d.]+)%\s+([\d,]+)\s", line)
        if m:
            rows[m[1]] = (float(m[2]) / 100, float(m[3]) / 100, int(m[4].replace(",", "")))
    return rows


def test_conversion_names_every_output_after_its_released_folder(prolong_data):
    names = {p.name for p in (prolong_data / "data").iterdir()}
    for repo, mixture in (("long-context-65536", "prolong-64k"), ("long-context-524288", "prolong-512k")):
        expected = {f"{repo}.{d}.{ext}" for d in MIXTURES[mixture] for ext in ("bin", "idx")}
        assert expected <= names
    assert not any("dclm-baseline" in n for n in names)  # not in the recipe: --mixture skipped it
    # the zstd shards were read in place: no decompressed copy next to them
    zstd = list((prolong_data / "datasets").rglob("shard.*.mds.zstd"))
    assert zstd and not [p for p in zstd if p.with_suffix("").exists()]


def test_recipe_mixtures_train_on_the_converted_release(prolong_data):
    N = 200  # samples of the run: one step of 200 x 64 tokens
    runs = {}
    for mixture, repo in (("prolong-64k", "long-context-65536"), ("prolong-512k", "long-context-524288")):
        runs[mixture] = _start([
            "pretrain_prolong.py", "--config", "examples/tiny_cpu.yaml", "data.mock=false",
            f"data.mixture={mixture}", f"data.data_prefix={prolong_data / 'data' / repo}",
            "train.steps=1", "train.seq_length=64", f"train.global_batch_size={N}", "train.micro_batch_size=20",
            "checkpoint.save_dir=null", "checkpoint.save_interval=0"])
    for mixture, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert re.search(r"^step +1/1 \| loss \d+\.\d+", out, re.M), out[-2000:]
        assert "WARNING" not in out  # every long folder fills the 64-token context
        table = _share_table(out)
        weights = MIXTURES[mixture]
        assert set(table) == set(weights)  # the released folder names, one dataset each
        assert sum(s for _, _, s in table.values()) == N
        for domain, (requested, effective, samples) in table.items():
            assert requested == pytest.approx(weights[domain], abs=5e-5)
            assert abs(samples - weights[domain] * N) <= 1, (mixture, domain, samples)
            assert effective == pytest.approx(samples / N, abs=5e-5)


@pytest.mark.parametrize("mixture, repo", [("prolong-64k", "long-context-65536"),
                                           ("prolong-512k", "long-context-524288")])
def test_every_sample_comes_from_the_folder_its_mixture_entry_names(prolong_data, mixture, repo):
    from megatron_prolong.data import build_train_dataset
    from megatron_prolong.data.config import DataConfig
    from megatron_prolong.data.mixtures import domain_of

    N = 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the miniature repeats
        ds = build_train_dataset(DataConfig(mixture=mixture, data_prefix=str(prolong_data / "data" / repo)),
                                 seq_length=64, seed=3, vocab_size=VOCAB, num_samples=N, log=lambda _: None)
    served = {d: 0 for d in MIXTURES[mixture]}
    for i in range(N):
        domain = domain_of(ds.source(i))
        lo, hi = _id_range(domain)
        tokens = ds[i]["tokens"]
        assert lo <= tokens.min() and tokens.max() < hi, (domain, i)  # book-524288 is not book-65536
        served[domain] += 1
    for domain, w in MIXTURES[mixture].items():
        assert abs(served[domain] - w * N) <= 1, (domain, served[domain])
    assert ds.blend_report["warnings"] == []
