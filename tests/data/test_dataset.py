"""Training-side datasets: packing rules, SFT masks in samples, mixtures, resume, config, ordering."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from megatron_prolong.data import PackedDataset, build_train_dataset, order_global_batch
from megatron_prolong.data.batch import SAMPLE_KEYS, collate, doc_ids_from_cu_seqlens
from megatron_prolong.data.config import DataConfig
from megatron_prolong.data.mixtures import MIXTURES
from tests.data._fixtures import counting_docs, write_indexed


def _check_contract(s: dict, S: int) -> None:
    assert set(s) == set(SAMPLE_KEYS)
    assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (S,)
    assert s["tokens"].dtype == np.int64 and s["labels"].dtype == np.int64
    assert s["loss_mask"].dtype == np.float32 and s["cu_seqlens"].dtype == np.int32
    doc_ids_from_cu_seqlens(s["cu_seqlens"], S)  # validates boundaries


@pytest.fixture
def pretrain_prefix(tmp_path):
    lengths = [7, 3, 12, 1, 5, 9, 2, 30, 4]
    return write_indexed(tmp_path / "pt", counting_docs(lengths)), lengths


def test_pretrain_packing_carries_overflow(pretrain_prefix):
    prefix, lengths = pretrain_prefix
    S = 8
    total = sum(lengths)
    n = (total - 1) // S  # samples within one epoch
    ds = PackedDataset(prefix, S, n, seed=3)
    docs = counting_docs(lengths)
    stream = np.concatenate([docs[d] for d in ds.doc_order[: len(lengths)]])
    starts = set(np.cumsum([0] + [lengths[d] for d in ds.doc_order[: len(lengths)]]).tolist())
    for i in range(n):
        s = ds[i]
        _check_contract(s, S)
        # Sample i is stream[i*S : i*S+S+1]: the cut document continues in the next sample.
        np.testing.assert_array_equal(s["tokens"], stream[i * S:(i + 1) * S])
        np.testing.assert_array_equal(s["labels"], stream[i * S + 1:(i + 1) * S + 1])
        for p in range(S):
            label_is_doc_start = (i * S + p + 1) in starts
            assert s["loss_mask"][p] == (0.0 if label_is_doc_start else 1.0), (i, p)
        expected_cu = sorted({0, S} | {x - i * S for x in starts if i * S < x < (i + 1) * S})
        np.testing.assert_array_equal(s["cu_seqlens"], expected_cu)
        np.testing.assert_array_equal(ds.doc_lengths(i), np.diff(s["cu_seqlens"]))
    # Every token except the very first is a label exactly once across consecutive samples.
    labels = np.concatenate([ds[i]["labels"] for i in range(n)])
    np.testing.assert_array_equal(labels, stream[1:n * S + 1])
    collate([ds[0], ds[1]])  # the trainer's collate accepts the items


def test_epoch_repeat_warns(pretrain_prefix):
    prefix, lengths = pretrain_prefix
    with pytest.warns(UserWarning, match="repeated over"):
        ds = PackedDataset(prefix, 16, 20, seed=0)
    assert ds.epochs > 1
    first_of_epoch1 = int(ds.epoch_first_sample[1])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds[first_of_epoch1 - 1]
        assert not rec
        ds[first_of_epoch1]
    assert any("starting epoch 1" in str(w.message) for w in rec)
    # the second epoch has its own shuffle
    n = len(lengths)
    assert sorted(ds.doc_order[n:2 * n]) == list(range(n))


def test_sft_packing_drops_overflow_and_pads(tmp_path):
    lengths = [5, 6, 4, 20, 3]
    docs = counting_docs(lengths)
    masks = [np.r_[np.zeros(n // 2), np.ones(n - n // 2)].astype(np.uint8) for n in lengths]
    prefix = write_indexed(tmp_path / "sft", docs, masks)
    S = 10
    ds = PackedDataset(prefix, S, 6, seed=1, sft=True, pad_token_id=0)
    order = ds.doc_order
    seen = []
    for i in range(6):
        s = ds[i]
        _check_contract(s, S)
        k0, k1 = ds.sample_first[i], ds.sample_end[i]
        members = [int(d) for d in order[k0:k1]]
        seen.extend(members)
        window = np.concatenate([docs[d][: S + 1] for d in members])
        assert len(window) <= S + 1
        # Whole documents only (except one longer than the window, truncated: overflow dropped).
        assert all(lengths[d] <= S + 1 for d in members) or len(members) == 1
        valid = len(window)
        full = np.zeros(S + 1, np.int64)
        full[:valid] = window
        np.testing.assert_array_equal(s["tokens"], full[:-1])
        np.testing.assert_array_equal(s["labels"], full[1:])
        mwin = np.zeros(S + 1, np.float32)
        mwin[:valid] = np.concatenate([masks[d][: S + 1] for d in members])
        starts = np.cumsum([0] + [min(lengths[d], S + 1) for d in members])[:-1]
        mwin[starts] = 0
        np.testing.assert_array_equal(s["loss_mask"], mwin[1:])  # SFT mask on labels, padding 0
        assert s["loss_mask"][max(valid - 1, 0):].sum() == 0
        cu = sorted({0, S} | {int(x) for x in starts if 0 < x < S} | ({valid} if valid < S else set()))
        np.testing.assert_array_equal(s["cu_seqlens"], cu)
    # The 20-token document is served alone and truncated to the window.
    long_doc = lengths.index(20)
    i = next(i for i in range(6) if long_doc in order[ds.sample_first[i]:ds.sample_end[i]])
    assert ds.sample_end[i] - ds.sample_first[i] == 1
    np.testing.assert_array_equal(ds[i]["tokens"], docs[long_doc][:S])
    # Samples take the shuffled documents in order, each exactly once: none skipped or split.
    assert seen == [int(d) for d in order[:len(seen)]]


def test_sft_requires_mask(tmp_path):
    prefix = write_indexed(tmp_path / "nomask", counting_docs([4, 4]))
    with pytest.raises(FileNotFoundError, match="nomask_mask.idx"):
        build_train_dataset(DataConfig(blend={prefix: 1.0}, sft=True), 8, 0, 1000, 4)


@pytest.fixture
def three_domains(tmp_path):
    rng = np.random.default_rng(0)
    prefixes = {}
    for k, name in enumerate(["code", "books", "web"]):
        lengths = rng.integers(5, 400, size=60 + 20 * k)
        prefixes[name] = write_indexed(tmp_path / f"data.{name}",
                                       counting_docs(lengths, vocab=1000, start=1 + 300 * k))
    return prefixes


def test_mixture_token_proportions(three_domains):
    weights = {"code": 0.5, "books": 0.3, "web": 0.2}
    blend = [{"prefix": three_domains[n], "weight": w} for n, w in weights.items()]
    S, N = 128, 3000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small datasets repeat
        ds = build_train_dataset(DataConfig(blend=blend), S, seed=7, vocab_size=1000, num_samples=N)
    assert len(ds) == N
    served = {n: 0 for n in weights}
    for i in range(N):
        s = ds[i]
        served[{v: k for k, v in three_domains.items()}[ds.source(i)]] += int(s["loss_mask"].size)
    total = sum(served.values())
    for n, w in weights.items():
        assert abs(served[n] / total - w) < 0.02, (n, served[n] / total)
    # also over a short prefix of the run (the blend is interleaved, not sorted)
    first = [ds.source(i) for i in range(200)]
    assert abs(first.count(three_domains["code"]) / 200 - 0.5) < 0.02


def test_resume_and_rebuild_identical(three_domains):
    cfg = DataConfig(blend={three_domains["code"]: 2, three_domains["web"]: 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = build_train_dataset(cfg, 64, seed=11, vocab_size=1000, num_samples=500)
        b = build_train_dataset(cfg, 64, seed=11, vocab_size=1000, num_samples=500)
        c = build_train_dataset(cfg, 64, seed=12, vocab_size=1000, num_samples=500)
    uninterrupted = [a[i] for i in range(500)]
    k = 137  # "resume" in a fresh instance at consumed_samples = k
    for j in range(500 - k):
        for key in SAMPLE_KEYS:
            np.testing.assert_array_equal(b[k + j][key], uninterrupted[k + j][key])
    assert any(not np.array_equal(c[i]["tokens"], uninterrupted[i]["tokens"]) for i in range(20))


def test_missing_prefix_fails_fast(tmp_path, three_domains):
    cfg = DataConfig(blend={three_domains["code"]: 1, str(tmp_path / "nope"): 1})
    with pytest.raises(FileNotFoundError, match=r"nope\.idx"):
        build_train_dataset(cfg, 64, 0, 1000, 10)


def test_vocab_check_on_serve(tmp_path):
    prefix = write_indexed(tmp_path / "v", [np.arange(20)])
    ds = build_train_dataset(DataConfig(blend=[prefix], shuffle_samples=False), 8, 0, vocab_size=10, num_samples=2)
    with pytest.raises(Exception, match="outside the vocabulary"):
        ds[1]


def test_order_global_batch(three_domains):
    ds = build_train_dataset(DataConfig(blend={three_domains["books"]: 1}), 512, 0, 1000, 16)
    idx = list(range(16))
    ordered = order_global_batch(ds, idx)
    assert sorted(ordered) == idx and ordered == order_global_batch(ds, idx)
    costs = [int((ds.doc_lengths(i).astype(np.int64) ** 2).sum()) for i in ordered]
    assert costs == sorted(costs, reverse=True)
    # any contract dataset works (cost read from cu_seqlens)
    mock = build_train_dataset(DataConfig(mock=True), 64, 0, 1000, 8)
    assert sorted(order_global_batch(mock, range(8))) == list(range(8))


def test_mock_and_config_validation(tmp_path):
    ds = build_train_dataset(DataConfig(mock=True), 32, 0, 100, 5)
    assert len(ds) == 5 and set(ds[0]) == set(SAMPLE_KEYS)
    with pytest.raises(ValueError, match="exactly one"):
        DataConfig()
    with pytest.raises(ValueError, match="exactly one"):
        DataConfig(mock=True, blend={"a": 1})
    with pytest.raises(ValueError, match="weight"):
        DataConfig(blend={"a": 0})
    with pytest.raises(ValueError, match="without .bin"):
        DataConfig(blend=["a.bin"])
    with pytest.raises(ValueError, match="data_prefix"):
        DataConfig(mixture="prolong-64k")
    with pytest.raises(ValueError, match="unknown"):
        DataConfig(mixture="nope", data_prefix="x")
    cfg = DataConfig(mixture="prolong-512k", data_prefix=str(tmp_path / "p"))
    entries = cfg.blend_entries()
    assert abs(sum(e["weight"] for e in entries) - 1.0) < 1e-9
    assert entries[0]["prefix"] == f"{tmp_path}/p.thestackv1_concat_by_repo-524288"
    with pytest.raises(FileNotFoundError, match="p.thestackv1_concat_by_repo-524288.idx"):
        build_train_dataset(cfg, 64, 0, 1000, 10)


def test_recipe_mixtures_sum_to_one():
    for name, mix in MIXTURES.items():
        assert abs(sum(mix.values()) - 1.0) < 1e-9, name
    assert MIXTURES["prolong-64k"]["book-65536"] == 0.30
    assert MIXTURES["prolong-512k"]["book-524288"] == 0.05


def test_sample_shuffle_is_a_seeded_permutation_within_epochs(tmp_path):
    prefix = write_indexed(tmp_path / "s", [np.arange(1, 400) % 97 + 1])
    plain = build_train_dataset(DataConfig(blend=[prefix], shuffle_samples=False), 16, 3, 128, 40)
    shuffled = build_train_dataset(DataConfig(blend=[prefix]), 16, 3, 128, 40)
    again = build_train_dataset(DataConfig(blend=[prefix]), 16, 3, 128, 40)
    served = [tuple(shuffled[i]["tokens"]) for i in range(40)]
    assert served == [tuple(again[i]["tokens"]) for i in range(40)]  # deterministic by seed
    windows = [tuple(plain[i]["tokens"]) for i in range(40)]
    assert served != windows
    # One epoch holds 398 // 16 = 24 whole windows: those are served first, in a new order.
    first_epoch = int(shuffled.epoch_first_sample[1])
    assert sorted(served[:first_epoch]) == sorted(windows[:first_epoch])


# ---- the blend report: token shares and the long-context check -----------------------------------

def _long_prefixes(tmp_path, lengths: dict[str, list[int]]) -> str:
    """P.<domain> datasets whose documents have the given lengths; returns P."""
    for domain, lens in lengths.items():
        write_indexed(tmp_path / f"p.{domain}", [np.full(n, 7, dtype=np.int32) for n in lens])
    return str(tmp_path / "p")


def _build(blend, seq_length, num_samples=4):
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny datasets repeat
        ds = build_train_dataset(DataConfig(blend=blend), seq_length, 0, 1000, num_samples, log=lines.append)
    return ds, lines


def test_64k_pieces_in_a_512k_run_warn_and_a_fitting_mix_does_not(tmp_path):
    K64, K512 = 65536, 524288
    p = _long_prefixes(tmp_path, {"book-65536": [K64, K64], "book-524288": [K64] * 3,  # 64K pieces
                                  "thestackv1_concat_by_repo-524288": [K512], "fineweb-edu": [900, 40]})
    fitting = {f"{p}.book-65536": 0.25, f"{p}.thestackv1_concat_by_repo-524288": 0.15, f"{p}.fineweb-edu": 0.6}
    ds, lines = _build(fitting, K512)
    assert ds.blend_report["warnings"] == [] and not any("WARNING" in l for l in lines)
    # book-524288 holding 64K pieces: attention would never span more than 64K for that share
    ds, lines = _build({**fitting, f"{p}.book-524288": 0.05}, K512)
    (warning,) = ds.blend_report["warnings"]
    assert "book-524288 is long data meant to supply 524,288-token documents" in warning
    assert "longest document has 65,536 tokens" in warning
    assert any(l.startswith("[data] WARNING: book-524288") for l in lines)
    # the 64K mix used in a 512K run: nothing fills the context
    ds, _ = _build({f"{p}.book-65536": 0.3, f"{p}.fineweb-edu": 0.7}, K512)
    assert ds.blend_report["warnings"] == [
        "no long-data document of this blend fills the 524,288-token context (longest: 65,536 tokens): "
        "attention never spans more than 65,536 tokens. Use a mixture made for this length (e.g. "
        "prolong-512k for 524288) or a shorter seq_length"]
    # ... and the same mix at 64K fits
    ds, _ = _build({f"{p}.book-65536": 0.3, f"{p}.fineweb-edu": 0.7}, K64)
    assert ds.blend_report["warnings"] == []


def test_blend_report_requested_vs_effective(three_domains):
    blend = {three_domains["code"]: 0.5, three_domains["books"]: 0.3, three_domains["web"]: 0.2}
    ds, lines = _build(blend, 32, num_samples=1000)
    rows = ds.blend_report["rows"]
    served = np.bincount([list(blend).index(ds.source(i)) for i in range(len(ds))], minlength=3)
    assert [r["samples"] for r in rows] == served.tolist()
    for r, w in zip(rows, blend.values()):
        assert r["requested"] == pytest.approx(w) and abs(r["effective"] - w) <= 1e-3
        assert r["intended"] is None and r["longest"] > 0
    assert lines[1].split() == ["[data]", "dataset", "requested", "effective", "samples", "epochs", "longest", "doc"]
    assert lines[2].split()[1:4] == ["code", "50.00%", "50.00%"]


def test_intended_doc_length_of_released_names():
    from megatron_prolong.data.mixtures import intended_doc_length

    assert intended_doc_length("book-524288") == 524288
    assert intended_doc_length("data/p/long-context-524288.thestackv1_concat_by_repo-65536") == 65536
    assert [intended_doc_length(d) for d in ("fineweb-2023-50", "textbooks", "fineweb-edu", "x-1000")] == [None] * 4
    long_64k = {d for d in MIXTURES["prolong-64k"] if intended_doc_length(d)}
    assert long_64k == {"thestackv1_concat_by_repo-65536", "book-65536"}
