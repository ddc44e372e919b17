"""The toy world's own ceiling on the held-out protocol: how faithful a perfectly stable policy can be.

A held-out condition fixes an object's visible parameters; its hidden part is free. Redrawing the hidden part
``k`` times (``objects.completions``) gives what the world itself would generate for that condition; the
*stable* ones among them are what a perfectly stable, perfectly faithful policy could output. The ceiling is
their IoU to the conditioning object, averaged per condition, then over the conditions that have one.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from dso_jax.batching import map_in_chunks
from dso_jax.toy import heldout, metrics, objects


def world_ceiling(seed: int, n: int, k: int = 16, stability_fn: Optional[Callable] = None, chunk: int = 64) -> dict:
    """The ceiling on the first ``n`` held-out conditions of ``seed`` from ``k`` hidden resamples each.

    ``stability_fn(occ (N, R, R, R)) -> {'stable', 'valid'}`` judges the resamples (e.g. MJX on the physics
    grid), ``chunk`` resamples per call; None: the world's static check. Returns ceiling_iou (mean IoU of the stable resamples), iou_all
    (of every resample), stable_rate (of the resamples), covered (share of conditions with a stable one) and
    best_iou (mean over conditions of the most faithful stable resample).
    """
    held = heldout.heldout_set(seed, n)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 11]))
    occ = np.stack([objects.completions(p, k, rng)["occ"] for p in held["params"]])  # (n, k, R, R, R)
    iou = np.asarray(metrics.iou_3d(occ, held["occ"][:, None]))  # (n, k)
    if stability_fn is None:
        stable = objects.static_stability(occ)["stable"]
    else:
        verdict = map_in_chunks(lambda o: stability_fn(jnp.asarray(o)), occ.reshape((-1,) + occ.shape[2:]), chunk)
        stable = (verdict["stable"] & verdict["valid"]).reshape(n, k)
    has = stable.any(axis=1)
    per = [iou[i][stable[i]] for i in range(n) if has[i]]
    return {
        "ceiling_iou": float(np.mean([p.mean() for p in per])) if per else float("nan"),
        "best_iou": float(np.mean([p.max() for p in per])) if per else float("nan"),
        "iou_all": float(iou.mean()),
        "stable_rate": float(stable.mean()),
        "covered": float(has.mean()),
    }
