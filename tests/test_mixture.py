"""Replay mixtures: exact proportions, determinism across resume and world sizes, epochs."""
import numpy as np
import pytest

from conftest import metrics, small_run_config
from rewarm.config import config_from_dict
from rewarm.data.mixture import Mixture, Source, proportion_pattern
from rewarm.data.shards import TokenShards
from rewarm.errors import UserError
from rewarm.train import train


@pytest.mark.parametrize("weights", [[0.95, 0.05], [0.5, 0.3, 0.2], [0.99, 0.01], [1, 1, 1, 1], [0.7, 0.2, 0.05, 0.05]])
def test_every_prefix_within_one_sequence_of_its_share(weights):
    pattern, shares = proportion_pattern(weights)
    n = np.arange(1, 3 * len(pattern) + 1)
    seq = np.tile(pattern, 3)
    for k, w in enumerate(weights):
        counts = np.cumsum(seq == k)
        assert np.all(np.abs(counts - w / sum(weights) * n) < 1), (k, weights)


def mixture(shards, weights=(0.95, 0.05), batch=16, seed=0, seq_len=32):
    srcs = [Source("downstream", TokenShards(shards["downstream"]), weights[0]),
            Source("upstream", TokenShards(shards["upstream"]), weights[1])]
    return Mixture(srcs, seq_len, batch, seed)


def test_five_percent_replay_counts_are_exact(shards):
    m = mixture(shards)
    counts = np.zeros(2, dtype=int)
    for step in range(40):
        _, src = m.batch(step)
        counts += np.bincount(src, minlength=2)
        n = (step + 1) * 16
        assert counts[1] == int(np.floor(0.05 * n)) or counts[1] == int(np.ceil(0.05 * n))
        assert counts.tolist() == [m.source_count(0, n), m.source_count(1, n)]
    assert counts.tolist() == [608, 32]  # 640 sequences: exactly 5%


def test_stream_identical_across_world_sizes_and_restarts(shards):
    one = mixture(shards)
    for step in (0, 7, 123):
        full, src = one.batch(step)
        halves = [mixture(shards).batch(step, rank, 2) for rank in (0, 1)]
        assert np.array_equal(np.concatenate([h[0] for h in halves]), full)
        assert np.array_equal(np.concatenate([h[1] for h in halves]), src)
        fresh = mixture(shards)  # a resumed process builds the mixture anew
        assert np.array_equal(fresh.batch(step)[0], full)


def test_windows_are_disjoint_within_an_epoch_and_reshuffled_after(shards):
    m = mixture(shards, weights=(1.0, 0.0))
    nw = m.num_windows[0]
    seen = [m.window_index(0, j) for j in range(nw)]
    assert sorted(w for _, w in seen) == list(range(nw)) and {e for e, _ in seen} == {0}
    second = [m.window_index(0, nw + j)[1] for j in range(nw)]
    assert sorted(second) == list(range(nw)) and second != [w for _, w in seen]
    tokens = TokenShards(shards["downstream"]).split("train")
    rows, _ = m.batch(0)
    first_w = seen[0][1]
    assert np.array_equal(rows[0], tokens[first_w * 32 : first_w * 32 + 33])
    assert m.epochs(nw * 2)["downstream"] == pytest.approx(2.0)


def test_bad_mixtures(shards, tmp_path):
    tiny = TokenShards(shards["upstream"])
    with pytest.raises(UserError, match="fewer than one window"):
        Mixture([Source("u", tiny, 1.0)], seq_len=10**7, global_batch=4, seed=0)
    with pytest.raises(UserError, match="weights must sum to > 0"):
        config_from_dict(small_run_config(tmp_path, shards, **{"data.train": [{"name": "a", "path": "x", "weight": 0}]}))
    with pytest.raises(UserError, match=r"`data.train\[1\].weight` must be in \[0"):
        config_from_dict(small_run_config(tmp_path, shards, **{"data.train": [{"name": "a", "path": "x"},
                                                                               {"name": "b", "path": "y", "weight": -0.5}]}))


def test_training_with_replay_logs_exact_source_tokens(tmp_path, shards):
    cfg = small_run_config(tmp_path / "replay", shards, **{
        "data.train": [{"name": "downstream", "path": str(shards["downstream"]), "weight": 0.95},
                       {"name": "upstream", "path": str(shards["upstream"]), "weight": 0.05}],
        "train.global_batch": 16, "train.micro_batch": 8, "train.max_steps": 10, "eval.interval": 10,
        "checkpoint.interval": 0})
    run = train(config_from_dict(cfg), progress=False)
    trains = metrics(run.path, "train")
    last = trains[-1]["source_tokens"]
    assert last == {"downstream": 152 * 32, "upstream": 8 * 32}  # 160 sequences, exactly 5% replay
    assert metrics(run.path)[0]["source_shares"] == {"downstream": 0.95, "upstream": 0.05}
