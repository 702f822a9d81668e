"""Train / validation / test splits by scan: no scan's slices on two sides."""

from __future__ import annotations

import numpy as np

from noduledet.errors import UserError


def split_scans(uids: list[str], subset_of: dict[str, int], test_fraction: float = 0.25,
                val_fraction: float = 0.0, test_subsets: tuple[int, ...] = (),
                val_subsets: tuple[int, ...] = (), seed: int = 0) -> dict[str, list[str]]:
    """Split scans into train, val and test.

    With ``test_subsets`` (and ``val_subsets``) the LUNA16 subsets are the folds: a scan goes
    where its subset says. Otherwise scans are shuffled with ``seed`` and cut by fraction (the
    paper's 3:1 train/test is ``test_fraction=0.25``).

    Returns:
        {"train": [...], "val": [...], "test": [...]}, each sorted.
    """
    uids = sorted(uids)
    if test_subsets or val_subsets:
        overlap = set(test_subsets) & set(val_subsets)
        if overlap:
            raise UserError(f"subsets {sorted(overlap)} are both validation and test")
        test = [u for u in uids if subset_of[u] in test_subsets]
        val = [u for u in uids if subset_of[u] in val_subsets]
    else:
        if not (0 <= test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
            raise UserError(f"test_fraction {test_fraction} + val_fraction {val_fraction} must stay below 1")
        order = np.random.default_rng(seed).permutation(len(uids))
        n_test = int(round(test_fraction * len(uids)))
        n_val = int(round(val_fraction * len(uids)))
        test = [uids[i] for i in order[:n_test]]
        val = [uids[i] for i in order[n_test:n_test + n_val]]
    held = set(test) | set(val)
    train = [u for u in uids if u not in held]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
