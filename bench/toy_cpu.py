"""Where the main job's CPU goes (issue 15): compile and run times of its pieces, one JSON line per piece.

    python bench/toy_cpu.py                       # all pieces
    python bench/toy_cpu.py --pieces noise,sample

Pieces: ``noise`` (a 5-D ``jax.random.normal`` draw against ``flow.normal``'s flat one), ``sample`` (one
round's 6 x 8 training candidates, ``sampler`` steps, ``online.sample_rows`` 0 / 8 / 4: wall, CPU, system time,
minor page faults and whether the samples equal the unchunked ones), ``physics`` (MJX at 64³ on 48 objects) and
``update`` (one NFT gradient on 48 candidates). CPU is the process's user + system time (getrusage).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import nft
from dso_jax import flow, lora, online_losses
from dso_jax.candidates import make_candidates_fn, policy_params, upsample
from dso_jax.models import load_pretrained
from dso_jax.models.ss_decoder import occupancy_from_logits
from dso_jax.physics.rollout import make_stability_fn
from dso_jax.toy import codec, heldout

SHAPE = (48,) + codec.LATENT_SHAPE  # one round: 6 conditions x 8 candidates


class Meter:
    """Wall, CPU (user + sys), sys and minor faults since the last ``lap``."""

    def __init__(self):
        self.t, self.r = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)

    def lap(self) -> dict:
        t, r = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        sys_s = r.ru_stime - self.r.ru_stime
        out = dict(
            wall_s=round(t - self.t, 2),
            cpu_s=round(r.ru_utime - self.r.ru_utime + sys_s, 2),
            sys_s=round(sys_s, 2),
            minor_faults=r.ru_minflt - self.r.ru_minflt,
        )
        self.t, self.r = t, r
        return out


def emit(**row):
    print(json.dumps(row), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pieces", default="noise,sample,physics,update")
    pieces = p.parse_args().pieces.split(",")
    config = nft.get_config("toy")
    apply_fn, base = load_pretrained(config.model.path)
    params = policy_params(base, None, jnp.float32)
    held = heldout.heldout_set(config.eval.seed, 48)
    key = jax.random.key(0)
    m = Meter()
    if "noise" in pieces:
        for name, draw in (("jax.random.normal", jax.random.normal), ("flow.normal", flow.normal)):
            jax.jit(lambda k: draw(k, SHAPE)).lower(key).compile()  # noqa: B023
            emit(piece="noise", draw=name, shape=SHAPE, compile=m.lap())
    if "sample" in pieces:
        cond = jnp.asarray(held["cond"][:6])
        ref = None
        for rows in (0, 8, 4):
            fn = make_candidates_fn(apply_fn, codec.decoder_fn, None, config.sampler, codec.LATENT_SHAPE, 8, rows=rows)
            comp = jax.jit(fn).lower(params, {}, cond, key).compile()
            row = dict(piece="sample", rows=rows, steps=config.sampler.steps, compile=m.lap())
            for i in range(2):
                z = np.asarray(jax.block_until_ready(comp(params, {}, cond, key))["z"])
                row[f"run{i}"] = m.lap()
            ref = z if ref is None else ref
            emit(**row, max_abs_diff_to_rows0=float(np.abs(z - ref).max()))
    if "physics" in pieces:
        stab = make_stability_fn(config.physics)
        z = codec.encode(held["occ"])
        comp = jax.jit(lambda z: stab(upsample(occupancy_from_logits(codec.decoder_fn({}, z)), 2))).lower(z).compile()
        row = dict(piece="physics", objects=48, grid=64, compile=m.lap())
        for i in range(2):
            jax.block_until_ready(comp(z))
            row[f"run{i}"] = m.lap()
        emit(**row)
    if "update" in pieces:
        ov = lora.init_overlay(jax.random.key(2), base, rank=config.lora.rank, alpha=config.lora.alpha)
        z = codec.encode(held["occ"]).reshape((6, 8) + codec.LATENT_SHAPE)
        stable = jnp.asarray(np.arange(48).reshape(6, 8) % 3 == 0)
        batch = {"cond": jnp.asarray(held["cond"][:6]), "z": z, "stable": stable}
        grad = jax.grad(lambda o, old, k: online_losses.nft_loss(apply_fn, base, o, old, batch, k, config)[0])
        comp = jax.jit(grad).lower(ov, ov, key).compile()
        row = dict(piece="update", candidates=48, compile=m.lap())
        for i in range(2):
            jax.block_until_ready(comp(ov, ov, key))
            row[f"run{i}"] = m.lap()
        emit(**row)


if __name__ == "__main__":
    main()
