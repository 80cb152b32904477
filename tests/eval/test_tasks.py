"""Needle cases, position buckets and the retrieval aggregation (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_prolong.eval.engine import Scores, vocab_parallel_pick, vocab_parallel_top1
from megatron_prolong.eval.haystack import RandomTokens, TokenStream, long_windows
from megatron_prolong.eval.needle import (KeyValueTask, PasskeyTask, assemble, build_cases, mean_by_length,
                                          retrieval_grid)
from megatron_prolong.eval.perplexity import position_edges


def test_assemble_places_needle_at_depth_and_answer_at_end():
    hay = TokenStream(np.arange(100, 400), "test")
    needle, tail = np.array([1, 2, 3]), np.array([7, 8, 9])
    for depth in (0.0, 0.5, 1.0):
        case = assemble(hay, needle, tail, 1, length=64, depth=depth, rng=np.random.default_rng(0))
        assert case.length == 64 and len(case.window) == 65
        n_hay = 65 - 3 - 3
        assert case.needle_start == round(depth * n_hay)
        assert list(case.window[case.needle_start:case.needle_start + 3]) == [1, 2, 3]
        assert list(case.window[-3:]) == [7, 8, 9]
        s = case.sample()
        assert s["loss_mask"].sum() == 1 and s["loss_mask"][-1] == 1 and s["labels"][-1] == 9
        assert list(s["cu_seqlens"]) == [0, 64]


def test_distractors_never_split_needles():
    task = KeyValueTask(512, num_needles=6)
    hay = RandomTokens(*task.haystack_range)
    for seed in range(20):
        case = task.case(hay, length=64, depth=0.3, rng=np.random.default_rng(seed))
        w = case.window[:-3]  # without the query
        starts = np.nonzero(w == task.NEEDLE)[0]
        assert len(starts) == 6
        keys, values = w[starts + 1], w[starts + 2]
        assert set(keys) <= set(task.keys) and set(values) <= set(task.values)
        asked = case.window[-2]
        assert case.window[-1] == values[list(keys).index(asked)]  # the answer belongs to the asked key
        assert sorted(case.candidates) == list(task.values)
        assert case.needle_start == starts[list(keys).index(asked)]


def test_training_window_targets_every_value():
    task = KeyValueTask(512, num_needles=4)
    window, mask = task.training_window(RandomTokens(*task.haystack_range), length=64,
                                        rng=np.random.default_rng(1))
    assert len(window) == 65 and mask.sum() == 4
    starts = np.nonzero(window == task.NEEDLE)[0]
    pairs = dict(zip(window[starts + 1], window[starts + 2]))
    for p in np.nonzero(mask)[0]:  # each target is the value of the key queried just before it
        assert window[p - 2] == task.QUERY and window[p] == pairs[window[p - 1]]


def test_passkey_answer_is_tokenised_as_in_running_text():
    from megatron_prolong.data.tokenize import TextTokenizer, llama3_tokenizer_dir

    tok = TextTokenizer(llama3_tokenizer_dir())
    task = PasskeyTask(tok)
    hay = TokenStream(np.asarray(tok.encode(["The grass is green. The sky is blue. " * 40])[0]), "filler")
    case = task.case(hay, length=256, depth=0.5, rng=np.random.default_rng(3))
    text = tok.decode(case.window)
    key = text.split("The pass key is ")[1][:5]
    assert key.isdigit() and text.endswith(f"The pass key is {key}")
    assert tok.decode(case.answer).strip() == key
    joint = tok.encode([f"{task.QUERY} {key}"])[0]
    assert list(case.window[-len(joint):]) == joint


def test_cases_are_deterministic_per_cell():
    task = KeyValueTask(512)
    hay = RandomTokens(*task.haystack_range)
    a = build_cases(task, hay, [64, 128], [0.0, 1.0], 2, seed=5)
    b = build_cases(task, hay, [128], [0.0, 1.0], 2, seed=5)
    assert len(a) == 8 and all(np.array_equal(x.window, y.window) for x, y in zip(a[4:], b))


def test_too_short_context_is_refused():
    task = KeyValueTask(512, num_needles=4)
    with pytest.raises(ValueError, match="too short"):
        task.case(RandomTokens(*task.haystack_range), length=12, depth=0.5, rng=np.random.default_rng(0))


def test_position_edges():
    assert position_edges(64) == [0, 1, 2, 4, 8, 16, 32, 64]
    assert position_edges(100) == [0, 1, 2, 4, 8, 16, 32, 64, 100]


def test_long_windows_prefer_whole_documents(tmp_path):
    from megatron_prolong.eval.haystack import indexed_stream
    from tests.data._fixtures import write_indexed

    write_indexed(str(tmp_path / "d"), [np.arange(10), np.arange(100, 200), np.arange(300, 340)])
    stream, store = indexed_stream(str(tmp_path / "d"))
    windows, whole = long_windows(store, stream, 32, 2, np.random.default_rng(0))
    assert whole and sorted(int(w[0]) for w in windows) == [100, 300]
    windows, whole = long_windows(store, stream, 64, 2, np.random.default_rng(0))
    assert not whole and all(len(w) == 65 for w in windows)


def test_retrieval_grid_from_hand_built_scores():
    task = KeyValueTask(512)
    cases = build_cases(task, RandomTokens(*task.haystack_range), [64], [0.0, 1.0], 2, seed=0)
    scores = Scores(loss_sum=4.0, tokens=4.0, sample_loss=np.array([0.1, 2.0, 0.5, 0.5]),
                    sample_tokens=np.ones(4), sample_mismatches=np.array([0, 1, 0, 0.0]),
                    sample_choice_correct=np.array([1, 0, 1, 1.0]))
    cells = retrieval_grid(cases, scores)
    assert [(c["depth"], c["exact_match"], c["choice_accuracy"]) for c in cells] == [(0.0, 0.5, 0.5), (1.0, 1.0, 1.0)]
    assert cells[0]["answer_logprob"] == pytest.approx(-1.05)
    assert mean_by_length(cells, "exact_match") == {64: 0.75}


def test_top1_and_choice_on_hand_built_logits():
    import torch

    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0],    # tie: the lower id wins, as torch.argmax
                           [5.0, -1.0, 2.0, 4.0]])
    assert vocab_parallel_top1(logits, 0).tolist() == [1, 0]
    ids = torch.tensor([[2, 3], [3, 1]])
    assert vocab_parallel_pick(logits, ids, 0).tolist() == [[1.0, 3.0], [4.0, -1.0]]
    # A shard holding ids [4, 8): nothing of ids < 4 is picked there.
    assert vocab_parallel_pick(logits, ids, 4).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert vocab_parallel_top1(logits, 4).tolist() == [5, 4]


def test_validation_dataset_names():
    from megatron_prolong.eval.periodic import short_names

    # valid_data_prefix domains: the shared stem goes
    assert short_names(["d/valid-65536.book-65536", "d/valid-65536.textbooks"]) == ["book-65536", "textbooks"]
    assert short_names(["a/books", "a/code"]) == ["books", "code"]
    assert short_names(["a/x", "b/x"]) == ["a/x", "b/x"]  # file names collide: the full prefixes


@pytest.mark.parametrize("use_te", [False, True], ids=["portable", "te-thd"])
def test_side_data_follows_the_tokens_through_the_cp_split(use_te):
    """Every scored token keeps its sample slot and position through the CP split (and TE's THD
    packing, which pads each document): over the CP ranks each (slot, position) appears once,
    next to its own token."""
    from types import SimpleNamespace

    import torch

    from megatron_prolong.eval.engine import ForwardScorer

    rng = np.random.default_rng(0)
    samples = []
    for cu in ([0, 5, 16], [0, 16]):  # two documents (THD pads the first to 8), one document
        tokens = rng.integers(1, 500, 16)
        samples.append({"tokens": tokens, "labels": tokens + 1, "loss_mask": np.ones(16, dtype=np.float32),
                        "cu_seqlens": np.array(cu, dtype=np.int32)})
    seen = []
    for cp_rank in range(2):
        cfg = SimpleNamespace(parallel=SimpleNamespace(context=2, tensor=1, sequence_parallel=False))
        run = SimpleNamespace(cp_rank=cp_rank, use_te=use_te, device=torch.device("cpu"))
        batch = ForwardScorer([], cfg, run)._micro_batch(samples, [0, 1])
        keep = batch["loss_mask"].reshape(-1) > 0
        for name in ("tokens", "eval_slot", "eval_position"):
            assert batch[name].shape == batch["loss_mask"].shape
        local = (batch[k].reshape(-1)[keep].tolist() for k in ("tokens", "eval_slot", "eval_position"))
        for tok, slot, pos in zip(*local):
            assert samples[slot]["tokens"][pos] == tok
            seen.append((slot, pos))
    assert sorted(seen) == [(s, p) for s in range(2) for p in range(16)]
