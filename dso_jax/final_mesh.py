"""Stage 2's final mesh: TRELLIS's post-processing of the FlexiCubes mesh, and DSO's stability verdict on it.

DSO simulates the GLB written by ``to_glb`` (``dso.md`` §2.2-2.3): :func:`final_mesh` is that mesh (before the GLB's
y-up turn), :func:`mesh_verdicts` takes it through the GLB frame and DSO's label preparation into MJX's mesh path,
without writing a file.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from dso_jax import mesh_export, mesh_postprocess


def final_mesh(result: dict, post: Optional[mesh_postprocess.PostprocessSettings], stats: Optional[dict] = None):
    """A stage-2 result's FlexiCubes mesh, post-processed with ``post`` (None: as extracted); z-up arrays."""
    mesh = result["mesh"]
    return mesh_postprocess.postprocess(mesh, post, stats) if post is not None and len(mesh.faces) else mesh


def mesh_verdicts(meshes: Sequence, physics, simulate=None) -> dict:
    """Final z-up meshes -> {angle, stable, valid} (B,) numpy, DSO's label protocol on MJX's mesh path: the GLB's
    y-up frame (``to_glb``), then the label script's preparation (y <-> z swap, no rescale, lowest point at z = 0),
    MuJoCo-legacy mass properties, the hull's contact proxy. A mesh MuJoCo would reject is invalid."""
    from dso_jax.physics import body, mesh_io, rollout

    n = len(meshes)
    out = dict(angle=np.full(n, np.nan, np.float32), stable=np.zeros(n, bool), valid=np.zeros(n, bool))
    bodies, where = [], []
    for i, m in enumerate(meshes):
        try:
            v = np.asarray(m.vertices, np.float64) @ mesh_export.Z_UP_TO_Y_UP.T
            prepared = mesh_io.prepare_mesh(v, m.faces, up_dir="y", rescale=False)
            bodies.append(body.mesh_body(prepared.vertices, prepared.faces, physics))
            where.append(i)
        except ValueError:  # MeshError and MuJoCo-like rejections: no verdict
            continue
    if bodies:
        sim = rollout.simulate_mesh_bodies(physics, bodies, batch_size=n, simulate=simulate)
        for j, i in enumerate(where):
            out["angle"][i], out["stable"][i], out["valid"][i] = sim["angle"][j], sim["stable"][j], sim["valid"][j]
    return out
