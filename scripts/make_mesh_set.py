"""Builds the public mesh set for the physics agreement study (reproducible; nothing third-party is committed).

Source: the 1000 procedurally generated objects `pybullet_data/random_urdfs/NNN/NNN.obj` shipped inside the
PyPI package `pybullet==3.2.7` (zlib licence), z-up. Either `pip install pybullet==3.2.7`, or pass the wheel
(`pip download --no-deps pybullet==3.2.7 -d /tmp/pb`) with --wheel; no install is needed then.

Recipe (seeded): pick --num_base objects; write each in three variants, as z-up OBJ files:
  asis    the object as shipped;
  posed   a uniformly random rotation (SO(3));
  stretch random per-axis stretch factors log-uniform in [1/2.5, 2.5], then a random tilt of 0–25 degrees.
Outputs OUT/meshes/*.obj and OUT/manifest.json (the recipe and per-mesh transform).

  python scripts/make_mesh_set.py --out runs/mesh_set [--wheel /tmp/pb/pybullet-3.2.7-*.whl]
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
import zipfile

import numpy as np

from dso_jax import cli


def _sources(wheel: str | None) -> dict[str, bytes]:
    """name -> OBJ bytes for every random_urdfs object."""
    if wheel:
        paths = glob.glob(wheel)
        if not paths:
            raise FileNotFoundError(f"--wheel {wheel}: no file matches")
        try:
            with zipfile.ZipFile(paths[0]) as z:
                names = sorted(
                    n for n in z.namelist() if n.startswith("pybullet_data/random_urdfs/") and n.endswith(".obj")
                )
                return {os.path.basename(n)[:-4]: z.read(n) for n in names}
        except zipfile.BadZipFile as e:
            raise ValueError(f"--wheel {paths[0]}: not a wheel (zip) file ({e})") from None
    try:
        import pybullet_data
    except ImportError:
        raise cli.UserError("pybullet_data not found: pip install pybullet==3.2.7, or pass --wheel") from None
    names = sorted(glob.glob(os.path.join(pybullet_data.getDataPath(), "random_urdfs", "*", "*.obj")))
    return {os.path.basename(n)[:-4]: open(n, "rb").read() for n in names}


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _tilt(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis_angle = rng.uniform(0, 2 * np.pi)
    axis = np.array([np.cos(axis_angle), np.sin(axis_angle), 0.0])
    theta = np.deg2rad(rng.uniform(0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k


def build(out: str, num_base: int, seed: int, wheel: str | None) -> dict:
    import trimesh

    sources = _sources(wheel)
    if len(sources) < num_base:
        raise ValueError(f"only {len(sources)} source meshes, --num_base asks for {num_base}")
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(sorted(sources), size=num_base, replace=False).tolist())
    os.makedirs(os.path.join(out, "meshes"), exist_ok=True)
    entries = []
    for name in picked:
        mesh = trimesh.load(io.BytesIO(sources[name]), file_type="obj", force="mesh", process=False)
        v0 = np.asarray(mesh.vertices, np.float64)
        v0 = v0 - v0.mean(0)
        f = np.asarray(mesh.faces)
        rot = _random_rotation(rng)
        stretch = np.exp(rng.uniform(np.log(1 / 2.5), np.log(2.5), size=3))
        tilt = _tilt(rng, 25.0)
        variants = {
            "asis": (np.eye(3), np.ones(3)),
            "posed": (rot, np.ones(3)),
            "stretch": (tilt, stretch),
        }
        for kind, (r, s) in variants.items():
            v = (v0 * s) @ r.T
            file = f"{name}_{kind}.obj"
            trimesh.Trimesh(v, f, process=False).export(os.path.join(out, "meshes", file))
            entries.append(
                dict(
                    file=file,
                    source=f"pybullet_data/random_urdfs/{name}/{name}.obj",
                    variant=kind,
                    rotation=np.round(r, 8).tolist(),
                    stretch=np.round(s, 8).tolist(),
                )
            )
    manifest = dict(
        recipe=dict(
            package="pybullet==3.2.7",
            source="pybullet_data/random_urdfs/*/*.obj",
            num_base=num_base,
            seed=seed,
            up_dir="z",
            variants=["asis", "posed", "stretch"],
        ),
        meshes=entries,
    )
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/mesh_set")
    parser.add_argument("--num_base", type=cli.positive_int, default=200)
    parser.add_argument("--seed", type=cli.non_negative_int, default=0)
    parser.add_argument("--wheel", default=None, help="path/glob of a downloaded pybullet wheel")
    args = parser.parse_args(argv)
    manifest = build(args.out, args.num_base, args.seed, args.wheel)
    print(f"wrote {len(manifest['meshes'])} meshes to {args.out}/meshes (manifest.json beside)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
