"""The static labels of the toy world agree with plain MuJoCo under DSO's protocol (1 ms, 10 s, 20°).

The body is what a voxel object is to a simulator: the convex hull of the voxels for contact and the
voxels' own mass properties (density 1000), released from rest with its lowest point on the floor.
"""

import mujoco
import numpy as np
from scipy.spatial import ConvexHull

from dso_jax.toy import objects as toy


def _final_angle_deg(occ, seconds=10.0):
    res = occ.shape[0]
    h = 1.0 / res
    idx = np.argwhere(occ).astype(np.float64)
    c = (idx + 0.5) * h - 0.5
    com = c.mean(0)
    d = c - com
    inertia = (np.sum(d * d) * np.eye(3) - d.T @ d + len(idx) * h * h / 6 * np.eye(3)) * 1000 * h**3
    corners = (idx[:, None] + np.array(np.meshgrid([0, 1], [0, 1], [0, 1])).reshape(3, -1).T[None]).reshape(-1, 3)
    corners = corners * h - 0.5
    hull = corners[ConvexHull(corners).vertices]
    zmin = hull[:, 2].min()
    hull[:, 2] -= zmin
    com[2] -= zmin
    i = inertia
    xml = f"""<mujoco><option timestep="0.001"/>
      <asset><mesh name="m" vertex="{" ".join(f"{v:.6f}" for v in hull.ravel())}"/></asset>
      <worldbody><geom type="plane" size="0 0 1"/>
        <body><freejoint/>
          <inertial pos="{com[0]} {com[1]} {com[2]}" mass="{1000 * len(idx) * h**3}"
                    fullinertia="{i[0, 0]} {i[1, 1]} {i[2, 2]} {i[0, 1]} {i[0, 2]} {i[1, 2]}"/>
          <geom type="mesh" mesh="m"/></body></worldbody></mujoco>"""
    model = mujoco.MjModel.from_xml_string(xml)
    data = mujoco.MjData(model)
    while data.time < seconds:
        mujoco.mj_step(model, data)
    w = data.qpos[3] / np.linalg.norm(data.qpos[3:7])
    return np.degrees(2 * np.arccos(np.clip(w, -1.0, 1.0)))


def test_static_labels_match_mujoco():
    d = toy.sample_objects(21, 40)
    pick = []
    for k in range(len(toy.KINDS)):  # one stable and one unstable object per family
        for st in (True, False):
            pick.append(np.flatnonzero((d["kind"] == k) & (d["stable"] == st))[0])
    angles = np.array([_final_angle_deg(d["occ"][i]) for i in pick])
    np.testing.assert_array_equal(angles < 20.0, d["stable"][pick])
    assert np.all(angles[d["stable"][pick]] < 2.0) and np.all(angles[~d["stable"][pick]] > 25.0)
