"""Class-proportional, nested subsets of a training set.

The paper subsamples ImageNet-21k "proportionally across classes" to N examples. We go one
step further and order the whole training set so that *every prefix* is class-proportional
(to within one example per class): the subset of size N is the first N of that order. For a
given seed a smaller subset is therefore always contained in a larger one, so a scaling
curve in N adds data rather than swapping it.
"""

from __future__ import annotations

import numpy as np


def proportional_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of ``range(len(labels))`` whose every prefix is class-proportional.

    Within class c (n_c examples, shuffled) the j-th example gets the key (j + 0.5) / n_c, its
    quantile in that class; sorting all examples by key interleaves the classes at their
    natural rates. Ties (classes of equal size) are broken at random.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        shuffled = rng.permutation(members)
        keys[shuffled] = (np.arange(len(members)) + 0.5) / len(members)
    tiebreak = rng.random(len(labels))
    return np.lexsort((tiebreak, keys))


HELD_OUT_SEED = 2**31 - 1  # one held-out split per dataset, whatever a trial's seed


def split_off(labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(the rest, a class-proportional held-out split of ``size`` examples), sorted indices.

    The split depends on the labels alone, so every trial of a grid holds out the same examples.
    """
    if not 0 < size < len(labels):
        raise ValueError(f"a held-out split of {size} from {len(labels)} examples leaves nothing on one side")
    order = proportional_order(labels, HELD_OUT_SEED)
    return np.sort(order[size:]), np.sort(order[:size])


def proportional_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-proportional subset of size ``n`` (nested across ``n``)."""
    if not 0 < n <= len(labels):
        raise ValueError(f"subset size {n} is outside 1..{len(labels)}")
    return proportional_order(labels, seed)[:n]
