"""Image -> GLB per stage on one GPU, full-size random weights, then ``generate_data --labels mesh`` throughput.

    python bench/pipeline.py                      # the lent H200: every row, one JSON line per result
    python bench/pipeline.py --smoke              # tiny presets and a tiny visibility raster on the CPU: runs?
    python bench/pipeline.py --voxels 12000,24000 --rows stages --twin

Models: ``load_models`` / ``load_stage2`` with ``--preset released`` random weights (DINOv2 ViT-L/14 reg4, SS flow
and decoder, SLat flow, mesh and Gaussian decoders: all the released architectures, bf16 torsos on the GPU).

``stages`` rows, seconds per object (median of ``--reps`` after a compile run, device synced per stage):
dinov2, stage1_sample (12 steps CFG 7.5) + ss_decode, structures (host: index tables, swin partitions,
subdivided levels), stage2_sample (12 steps CFG 3), mesh_decode, gs_decode, flexicubes, postprocess (to_glb's:
simplify 0.95, visibility, min cut, holes), glb_write, ply_write, mjx_verdict (MJX mesh path, the mesh preset).
Stage 2 runs on ``--objects`` structures of exactly ``--voxels`` voxels: the voxels nearest a sphere of radius 0.35
(``--sdf sphere``, default) or ``sparse.example_coords`` blobs (``--sdf decoder``); random stage-1 weights occupy
half the 64³ grid, which no trained model does. ``--sdf sphere`` also replaces the mesh decoder's 8 SDF channels by
that sphere's before FlexiCubes, so that extraction and post-processing see a surface like a trained decoder's
instead of random-sign noise (a surface through most cubes); ``--sdf decoder`` keeps them.

``data`` row: ``generate.generate_dataset(labels='mesh')`` on ``--data_images`` images x 4 samples end to end,
objects per minute; the random SS decoder's output bias is set so that its occupancy holds about ``--voxels``
voxels, and ``--sdf sphere`` applies there too (the surface is where the occupancy meets the sphere). The TFDS
dataset is built only where ``tensorflow_datasets`` imports (``build`` in the row). Peak device memory
(``memory_stats()['peak_bytes_in_use']``; host max RSS on the CPU) on every row.

``--twin`` adds the plain-torch twin decoders (``tests/twins/slat_decoder_twin.py``, fp16 torso on the GPU) on the
same shells: TRELLIS's own decoders need spconv, flash-attn and kaolin, which the device image does not have.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dso_jax import gaussians, mesh_export, mesh_extract, mesh_postprocess, sampling, sparse  # noqa: E402
from dso_jax.final_mesh import mesh_verdicts  # noqa: E402
from dso_jax.models import dinov2, pretrained  # noqa: E402
from dso_jax.models.stage2 import load_stage2  # noqa: E402
from dso_jax.pipeline import Generator, Stage2  # noqa: E402


def emit(**row):
    print(json.dumps(row), flush=True)


def peak_gib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return round(stats["peak_bytes_in_use"] / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # host KiB -> GiB


def timed(fn, reps: int):
    """(first-call seconds, median seconds of ``reps`` more calls, last result); fn must block until done."""
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times) if times else first, out


def block(tree):
    return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def sphere_sdf(raw: sparse.SparseBatch, radius: float = 0.35) -> sparse.SparseBatch:
    """The raw output with its corner SDFs replaced by a sphere's (+1/res, undone by TRELLIS's bias)."""
    feats = np.array(raw.feats)
    res, coords = raw.resolution, np.asarray(raw.coords)
    corners = (coords[:, :, None, :] + mesh_extract.CORNERS[None, None]) / res - 0.5  # (B, N, 8, 3)
    feats[..., mesh_extract.SDF] = np.linalg.norm(corners, axis=-1) - radius + 1.0 / res
    return raw.replace(feats=feats)


def sphere_shell(n: int, res: int = 64) -> np.ndarray:
    """(n, 3) voxels nearest to a sphere of radius 0.35 (the shape of ``sphere_sdf``)."""
    g = np.stack(np.meshgrid(*[np.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
    d = np.abs(np.linalg.norm((g + 0.5) / res - 0.5, axis=1) - 0.35)
    return g[np.sort(np.argpartition(d, n - 1)[:n])].astype(np.int32)


def postprocess_settings(args) -> mesh_postprocess.PostprocessSettings:
    """``to_glb``'s post-processing at this port's defaults, or the visibility budget given on the command line."""
    post = mesh_postprocess.PostprocessSettings()
    return dataclasses.replace(
        post, num_views=args.views or post.num_views, resolution=args.post_resolution or post.resolution
    )


def bench_stages(args, models, stage2_models, voxels: int):
    m, reps, b = models, args.reps, args.objects
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 255, (b, 518, 518, 3), np.uint8))
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    enc = jax.jit(lambda p, x: dinov2.encode_condition(p, x, m.dinov2_cfg, dtype))
    first, s, cond = timed(lambda: block(enc(m.dinov2_params, images)), reps)
    emit(row="stages", stage="dinov2", objects=b, s_per_object=s / b, compile_s=first - s, peak_gib=peak_gib())
    noise = jnp.asarray(rng.standard_normal((b,) + m.latent_shape, np.float32))
    gen = Generator(m, sampling.DSO_STAGE1, images_per_batch=b)
    sample = jax.jit(lambda p, n, c: sampling.sample_from_config(m.flow, p, n, c, sampling.DSO_STAGE1))
    first, s, z = timed(lambda: block(sample(gen._fp, noise, cond)), reps)
    emit(row="stages", stage="stage1_sample", objects=b, s_per_object=s / b, compile_s=first - s, peak_gib=peak_gib())
    dec = jax.jit(lambda p, z: m.decoder(p, z))
    first, s, _ = timed(lambda: block(dec(gen._dp, z)), reps)
    emit(row="stages", stage="ss_decode", objects=b, s_per_object=s / b, compile_s=first - s, peak_gib=peak_gib())

    s2 = Stage2(stage2_models, sampling.DSO_STAGE2, objects_per_batch=b, quantum=args.quantum)
    shells = [
        sphere_shell(voxels) if args.sdf == "sphere" else sparse.example_coords((voxels,), 64, seed=i)[:, 1:]
        for i in range(b)
    ]
    first, s, (fb, db) = timed(lambda: s2.structures(shells), reps)
    emit(row="stages", stage="structures", voxels=voxels, objects=b, s_per_object=s / b, peak_gib=peak_gib())
    c = np.repeat(np.asarray(cond[:1], np.float32), b, 0)
    first, s, slat = timed(lambda: block(s2.sample(fb, c, list(range(b)))), reps)
    emit(
        row="stages",
        stage="stage2_sample",
        voxels=voxels,
        objects=b,
        s_per_object=s / b,
        compile_s=first - s,
        peak_gib=peak_gib(),
    )
    first, s, raw = timed(lambda: s2.decode_mesh(db, slat), reps)
    emit(
        row="stages",
        stage="mesh_decode",
        voxels=voxels,
        objects=b,
        s_per_object=s / b,
        compile_s=first - s,
        rows_256=int(raw.mask.sum()),
        peak_gib=peak_gib(),
    )
    if s2.gaussians:
        first, s, gs_raw = timed(lambda: s2.decode_gaussians(db, slat), reps)
        emit(
            row="stages",
            stage="gs_decode",
            voxels=voxels,
            objects=b,
            s_per_object=s / b,
            compile_s=first - s,
            peak_gib=peak_gib(),
        )
    raw1 = raw.replace(feats=raw.feats[:1], levels=jax.tree.map(lambda a: a[:1], raw.levels))
    raw1 = sphere_sdf(raw1) if args.sdf == "sphere" else raw1
    _, s, meshes = timed(lambda: mesh_extract.flexicubes(raw1), reps)
    emit(row="stages", stage="flexicubes", voxels=voxels, s_per_object=s, faces=len(meshes[0].faces), sdf=args.sdf)
    post = postprocess_settings(args)
    stats: dict = {}
    first, s, final = timed(lambda: mesh_postprocess.postprocess(meshes[0], post, stats), reps)
    emit(row="stages", stage="postprocess", voxels=voxels, s_per_object=s, first_s=first, **stats, peak_gib=peak_gib())
    with tempfile.TemporaryDirectory() as tmp:
        _, s, _ = timed(
            lambda: mesh_export.write_colored_glb(
                final.vertices, final.faces, final.vertex_colors, os.path.join(tmp, "a.glb")
            ),
            reps,
        )
        emit(row="stages", stage="glb_write", s_per_object=s, faces=len(final.faces))
        if s2.gaussians:
            g = gaussians.gaussians_from_decoder(
                gs_raw, config=gaussians.decoder_config(stage2_models.gs_decoder.module)
            )
            _, s, _ = timed(lambda: gaussians.save_ply(os.path.join(tmp, "a.ply"), g[0]), reps)
            emit(row="stages", stage="ply_write", s_per_object=s, gaussians=len(g[0]["xyz"]))
    from dso_jax.physics import rollout

    physics = rollout.SIM_PRESETS["mesh"]()
    simulate = jax.jit(rollout.make_simulator(physics))
    first, s, v = timed(lambda: mesh_verdicts([final] * b, physics, simulate), reps)
    emit(
        row="stages",
        stage="mjx_verdict",
        objects=b,
        s_per_object=s / b,
        compile_s=first - s,
        angle=float(v["angle"][0]),
        peak_gib=peak_gib(),
    )
    if args.twin:
        bench_twin(args, stage2_models, shells, slat, voxels, reps)


def bench_twin(args, stage2_models, shells, slat, voxels, reps):
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from twins import slat_decoder_twin as dt
    from twins import slat_twin as st

    from dso_jax.convert import trellis
    from dso_jax.models.stage2 import STAGE2_PRESETS

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    coords = np.c_[np.zeros((len(shells[0]), 1), np.int32), shells[0]]
    feats = np.asarray(slat[0, : len(shells[0])], np.float32)
    _, mesh_args, gs_args = STAGE2_PRESETS[args.preset]
    for key, fn, params, cfg_args, cls in (
        ("mesh", stage2_models.mesh_decoder, stage2_models.mesh_decoder_params, mesh_args, dt.SLatMeshDecoder),
        ("gs", stage2_models.gs_decoder, stage2_models.gs_decoder_params, gs_args, dt.SLatGaussianDecoder),
    ):
        if fn is None:
            continue
        config = {"name": type(fn.module).__name__, "args": dict(cfg_args)}
        sd = trellis.params_to_torch_state_dict(
            jax.tree.map(np.asarray, params), config, dtype="float32", buffers=pretrained.buffers_of(fn.module)
        )
        twin = cls(**{**config["args"], "use_fp16": False})
        twin.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})
        twin = twin.to(dev)
        if dev == "cuda":
            twin.to_fp16()
        x = st.from_numpy(coords, feats, dev)

        def run():
            with torch.no_grad():
                out = twin(x)
            if dev == "cuda":
                torch.cuda.synchronize()
            return out

        first, s, _ = timed(run, reps)
        emit(row="twin", stage=f"{key}_decode", voxels=voxels, s_per_object=s, first_s=first, device=dev)


def bench_data(args, voxels: int):
    from dso_jax import generate
    from dso_jax.physics import rollout

    models = pretrained.load_models(random_weights=args.preset)
    z = jax.random.normal(jax.random.PRNGKey(0), (1,) + models.latent_shape)
    logits = np.asarray(models.decoder(models.decoder_params, z)).ravel()
    bias = models.decoder_params["out_layer_2"]["bias"] - np.quantile(logits, 1 - voxels / logits.size)
    models.decoder_params["out_layer_2"]["bias"] = jnp.asarray(bias, jnp.float32)  # ~voxels occupied
    physics = rollout.SIM_PRESETS["mesh"]()
    gen = Generator(models, sampling.DSO_STAGE1, images_per_batch=args.batch_images, physics=physics)
    s2 = Stage2(
        load_stage2(random_weights=args.preset, gaussians=False), objects_per_batch=args.objects, quantum=args.quantum
    )
    if args.sdf == "sphere":  # a surface like a trained decoder's, not random-sign noise
        s2.decode_mesh = lambda db, slat: sphere_sdf(Stage2.decode_mesh(s2, db, slat))
    from PIL import Image

    build = importlib.util.find_spec("tensorflow_datasets") is not None

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(1)
        paths = []
        for i in range(args.data_images):
            a = np.zeros((256, 256, 4), np.uint8)
            a[40:220, 60:200] = rng.integers(0, 256, (180, 140, 4))
            a[40:220, 60:200, 3] = 255
            paths.append(os.path.join(tmp, "imgs", "obj", f"{i:03d}.png"))
            os.makedirs(os.path.dirname(paths[-1]), exist_ok=True)
            Image.fromarray(a, "RGBA").save(paths[-1])
        t = time.perf_counter()
        summary = generate.generate_dataset(
            gen,
            paths,
            os.path.join(tmp, "data"),
            labels="mesh",
            stage2=s2,
            postprocess=postprocess_settings(args),
            build_dataset=build,
            log=lambda _: None,
        )
        dt = time.perf_counter() - t
    emit(
        row="data",
        labels="mesh",
        images=args.data_images,
        samples=summary["samples"],
        seconds=dt,
        objects_per_min=60 * summary["samples"] / dt,
        invalid=summary["invalid"],
        build=build,
        sdf=args.sdf,
        peak_gib=peak_gib(),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny presets, small shells, 1 rep (CPU)")
    ap.add_argument("--preset", default="released", choices=["released", "tiny"])
    ap.add_argument("--voxels", default="20000", help="comma-separated stage-2 voxel counts")
    ap.add_argument("--objects", type=int, default=4, help="objects per batch")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quantum", type=int, default=4096)
    ap.add_argument("--sdf", default="sphere", choices=["sphere", "decoder"])
    ap.add_argument("--rows", default="stages,data")
    ap.add_argument("--data_images", type=int, default=8)
    ap.add_argument("--batch_images", type=int, default=2)
    ap.add_argument("--twin", action="store_true")
    ap.add_argument("--views", type=int, help="visibility views (default: PostprocessSettings')")
    ap.add_argument("--post_resolution", type=int, help="visibility raster (default: PostprocessSettings')")
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.voxels, args.objects, args.reps, args.quantum = "tiny", "600", 2, 1, 1024
        args.data_images, args.batch_images, args.views, args.post_resolution = 1, 1, 24, 96
    emit(row="device", backend=jax.default_backend(), device=str(jax.devices()[0]), preset=args.preset)
    rows = args.rows.split(",")
    for voxels in (int(v) for v in args.voxels.split(",")):
        if "stages" in rows:
            models = pretrained.load_models(random_weights=args.preset)
            bench_stages(args, models, load_stage2(random_weights=args.preset), voxels)
        if "data" in rows:
            bench_data(args, voxels)


if __name__ == "__main__":
    main()
