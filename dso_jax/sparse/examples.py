"""Example voxel sets for tests, benches and ``--verify``: random ellipsoidal shells, TRELLIS's coords layout.

SLat voxels are surface shells (stage 1's occupancy is a shell), so an object of n voxels is the n
cells nearest to the surface of a random ellipsoid sized for a shell about two voxels thick. Rows come in ``argwhere`` order (batch, then x, y, z).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def shell(n: int, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) int32 distinct cells of a [0, resolution)³ grid hugging a random ellipsoid, sorted (x, y, z)."""
    if not 0 < n <= resolution**3:
        raise ValueError(f"shell: cannot place {n} voxels in a {resolution}^3 grid")
    grid = np.stack(np.meshgrid(*[np.arange(resolution)] * 3, indexing="ij"), -1).reshape(-1, 3)
    r = min(np.sqrt(n / (2 * 4 * np.pi)), 0.4 * resolution)  # a shell about two voxels thick where it fits
    centre = (resolution - 1) / 2 + rng.uniform(-0.04, 0.04, 3) * resolution
    radii = np.clip(r * rng.uniform(0.75, 1.1, 3), 1.5, 0.44 * resolution)
    dist = np.abs(np.linalg.norm((grid - centre) / radii, axis=1) - 1.0) * radii.min()
    dist += rng.uniform(0.0, 1e-3, dist.shape)  # break ties at random
    return grid[np.sort(np.argpartition(dist, n - 1)[:n])].astype(np.int32)


def example_coords(counts: Sequence[int], resolution: int = 64, seed: int = 0) -> np.ndarray:
    """(sum(counts), 4) int32 ``[batch, x, y, z]``: object b is a shell of ``counts[b]`` voxels."""
    rng = np.random.default_rng(seed)
    parts = [np.concatenate([np.full((n, 1), b, np.int32), shell(n, resolution, rng)], 1) for b, n in enumerate(counts)]
    return np.concatenate(parts, axis=0)
