"""TRELLIS's ``FlowEulerGuidanceIntervalSampler`` as a pure, jittable, batched function.

Semantics (``trellis.md`` §5): times ``t_i = r s_i / (1 + (r - 1) s_i)`` with ``s = linspace(1, 0, N+1)``
computed in float64 on the host; the model sees ``1000 t_i`` (float32); guidance
``v = (1 + w) v(cond) - w v(neg_cond)`` applies when ``lo <= t_i <= hi`` (inclusive, on the rescaled
t); Euler update ``x <- x - (t_i - t_{i+1}) v``. The guided steps form one contiguous run of the
schedule, so the sampler is at most three ``lax.scan`` segments; inside a guided segment the
conditional and unconditional halves go through the model as one batch of 2B.

Stage 2 (:func:`sample_slat`, TRELLIS's ``sample_slat``) runs the same sampler on the features of a
``SparseBatch`` (the structure is bound into the model call and tiled for the 2B call inside the jit),
then denormalises with pipeline.json's ``slat_normalization``. TRELLIS's ``sigma_min`` only enters its
x0 / eps read-outs, never the Euler update, so it has no parameter here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dso_jax.flow import TIME_SCALE
from dso_jax.sparse.batch import SparseBatch

ApplyFn = Callable[..., jax.Array]  # apply_fn(params, x (B, ...), t (B,), cond (B,S,Cc)) -> v (B, ...)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The Euler guidance-interval sampler's parameters (the keys of pipeline.json's ``*_sampler.params``)."""

    steps: int
    cfg_strength: float
    cfg_interval: tuple = (0.5, 1.0)
    rescale_t: float = 3.0

    def to_dict(self) -> dict:
        return dict(
            steps=self.steps,
            cfg_strength=self.cfg_strength,
            cfg_interval=tuple(self.cfg_interval),
            rescale_t=self.rescale_t,
        )


# The presets, defined here once (trellis.md §1.1, §5; dso.md): every config, CLI and bench reads them.
TRELLIS_PIPELINE = SamplerSettings(steps=25, cfg_strength=5.0)  # pipeline.json, both stages
DSO_STAGE1 = SamplerSettings(steps=12, cfg_strength=7.5)  # TRELLIS's app/README; DSO's data, eval and example
DSO_STAGE2 = SamplerSettings(steps=12, cfg_strength=3.0)  # TRELLIS's app/README; DSO's data generation
TOY = SamplerSettings(steps=10, cfg_strength=3.0)  # the shipped toy model's (its evaluation and the main job)

# pipeline.json ``slat_normalization`` (trellis.md §1.1): the SLat flow works on (slat - mean) / std per channel.
SLAT_NORMALIZATION = {
    "mean": (
        -2.1687545776367188,
        -0.004347046371549368,
        -0.13352349400520325,
        -0.08418072760105133,
        -0.5271206498146057,
        0.7238689064979553,
        -1.1414450407028198,
        1.2039363384246826,
    ),
    "std": (
        2.377650737762451,
        2.386378288269043,
        2.124418020248413,
        2.1748552322387695,
        2.663944721221924,
        2.371192216873169,
        2.6217446327209473,
        2.684523105621338,
    ),
}


def euler_schedule(steps: int, rescale_t: float) -> np.ndarray:
    """The (steps + 1,) float64 time grid from 1 to 0."""
    s = np.linspace(1.0, 0.0, steps + 1)
    return rescale_t * s / (1.0 + (rescale_t - 1.0) * s)


def guided_steps(ts: np.ndarray, cfg_strength: float, cfg_interval: Sequence[float]) -> np.ndarray:
    """Boolean (steps,) mask: step i is guided iff cfg_strength != 0 and lo <= t_i <= hi."""
    lo, hi = cfg_interval
    t = ts[:-1]
    return (lo <= t) & (t <= hi) & (cfg_strength != 0.0)


def _segments(mask: np.ndarray):
    """Split step indices into maximal runs of equal guidance: [(start, stop, guided), ...]."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((start, i, bool(mask[start])))
            start = i
    return out


def sample(
    apply_fn: ApplyFn,
    params,
    noise: jax.Array,
    cond: jax.Array,
    neg_cond: Optional[jax.Array] = None,
    *,
    steps: int,
    rescale_t: float,
    cfg_strength: float,
    cfg_interval: Sequence[float] = (0.0, 1.0),
    null_cond: bool = True,
) -> jax.Array:
    """Draw x_0 from ``noise`` (B, ...) given ``cond`` (B or 1, S, Cc); returns (B, ...) like ``noise``.

    ``neg_cond`` defaults to zeros like ``cond`` (TRELLIS's unconditional input). With ``null_cond`` (the
    default) that all-zero input is passed to the model as ``cond=None``, which the TRELLIS ports evaluate
    exactly without the cross-attention (``attention.MultiHeadAttention``), and a guided step makes two
    B-row calls instead of one 2B-row call; ``null_cond=False`` feeds the zeros (same result to rounding).
    """
    b = noise.shape[0]
    if cond.shape[0] == 1 and b > 1:
        cond = jnp.broadcast_to(cond, (b,) + cond.shape[1:])
    shortcut = neg_cond is None and null_cond
    if neg_cond is None:
        neg_cond = jnp.zeros_like(cond)
    elif neg_cond.shape[0] == 1 and b > 1:
        neg_cond = jnp.broadcast_to(neg_cond, (b,) + neg_cond.shape[1:])
    if cond.shape[0] != b or neg_cond.shape[0] != b:
        raise ValueError(f"sample: cond batch {cond.shape[0]} / neg_cond batch {neg_cond.shape[0]} != noise batch {b}")

    ts = euler_schedule(steps, rescale_t)
    model_t = (TIME_SCALE * ts[:-1]).astype(np.float32)  # what the model sees at step i
    dts = (ts[:-1] - ts[1:]).astype(np.float32)
    mask = guided_steps(ts, cfg_strength, cfg_interval)
    w = jnp.float32(cfg_strength)
    both_cond = jnp.concatenate([cond, neg_cond], axis=0)  # (2B, S, Cc)

    def plain_step(x, step):
        t, dt = step
        v = apply_fn(params, x, jnp.full((b,), t), cond)
        return x - dt * v.astype(x.dtype), None

    def guided_step(x, step):
        t, dt = step
        if shortcut:  # conditional and all-zero halves as two calls: the zero half skips cross-attention
            tb = jnp.full((b,), t)
            v = (1.0 + w) * apply_fn(params, x, tb, cond) - w * apply_fn(params, x, tb, None)
        else:
            v_both = apply_fn(params, jnp.concatenate([x, x], axis=0), jnp.full((2 * b,), t), both_cond)
            v = (1.0 + w) * v_both[:b] - w * v_both[b:]
        return x - dt * v.astype(x.dtype), None

    x = noise
    for start, stop, guided in _segments(mask):
        xs = (jnp.asarray(model_t[start:stop]), jnp.asarray(dts[start:stop]))
        x, _ = jax.lax.scan(guided_step if guided else plain_step, x, xs)
    return x


def sample_from_config(apply_fn: ApplyFn, params, noise, cond, cfg, neg_cond=None) -> jax.Array:
    """:func:`sample` with keys ``steps, rescale_t, cfg_strength, cfg_interval`` read from a ConfigDict."""
    return sample(
        apply_fn,
        params,
        noise,
        cond,
        neg_cond,
        steps=cfg.steps,
        rescale_t=cfg.rescale_t,
        cfg_strength=cfg.cfg_strength,
        cfg_interval=tuple(cfg.cfg_interval),
    )


def sample_slat(
    apply_fn: ApplyFn,
    params,
    noise: SparseBatch,
    cond: jax.Array,
    neg_cond: Optional[jax.Array] = None,
    *,
    steps: int,
    rescale_t: float,
    cfg_strength: float,
    cfg_interval: Sequence[float] = (0.0, 1.0),
    normalization: Optional[dict] = SLAT_NORMALIZATION,
    null_cond: bool = True,
) -> SparseBatch:
    """TRELLIS's stage-2 sampling: :func:`sample` on the features of ``noise`` (its voxels and structure fixed),
    then ``slat * std + mean`` (``normalization``; None keeps the normalised latent). Padding rows stay 0.

    ``apply_fn(params, x: SparseBatch, t (B,), cond (B, S, Cc)) -> SparseBatch`` (the SLat flow of
    ``load_pretrained``). ``noise`` is ``sparse.from_trellis(coords, eps)`` with eps (M, C) standard normal
    (TRELLIS: ``torch.randn(M, 8)`` on the CPU after ``manual_seed``). Jittable: one compile per bucket.
    """

    def velocity(p, feats, t, c):  # feats (k B, N, C): the structure is tiled k times inside the jit
        return apply_fn(p, noise.with_feats(feats), t, c).feats

    x = sample(
        velocity,
        params,
        noise.feats,
        cond,
        neg_cond,
        steps=steps,
        rescale_t=rescale_t,
        cfg_strength=cfg_strength,
        cfg_interval=cfg_interval,
        null_cond=null_cond,
    )
    if normalization is not None:
        std = jnp.asarray(normalization["std"], jnp.float32)
        mean = jnp.asarray(normalization["mean"], jnp.float32)
        x = x * std + mean
    return noise.replace(feats=jnp.where(noise.mask[..., None], x, 0.0))
