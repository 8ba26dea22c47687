"""A deliberately expensive `data.transforms` step for bench/cache.py: `rounds` random tanh layers over
each row's features (real CPU work, like feature extraction; no sleeps)."""
import numpy as np


def random_features(batch, rounds=100):
    x = batch["x"].astype(np.float32)
    w = np.random.default_rng(0).standard_normal((x.shape[1], x.shape[1])).astype(np.float32) / np.sqrt(x.shape[1])
    for _ in range(rounds):
        x = np.tanh(x @ w)
    return {**batch, "x": x}
