"""Bodies: MuJoCo-legacy mass properties, voxel mass properties, the contact proxy, occupancy vs mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_physics_shapes as shapes

from dso_jax.physics import body, reference, rollout


def _cfg():
    return rollout.default_sim_config()


def _body(occ, cfg=None):
    cfg = cfg or _cfg()
    return jax.jit(lambda o: body.occupancy_body(o, cfg))(jnp.asarray(occ))


def _mujoco_mass(v, f):
    m = reference.build_model(v, f)
    return m.body_mass[1], np.array(m.body_ipos[1]), np.sort(np.array(m.body_inertia[1]))


@pytest.mark.parametrize("name", ["box", "tilted_box", "l_overhang", "open_box", "wedge"])
def test_legacy_mass_properties_equal_mujoco(name):
    mesh = {
        "box": shapes.box_mesh((0.3, 0.5, 0.7)),
        "tilted_box": shapes.box_mesh((0.2, 0.3, 0.9), tilt_deg=17),
        "l_overhang": shapes.l_mesh(True),
        "open_box": shapes.box_mesh((0.4, 0.4, 0.4)),
        "wedge": shapes.wedge_mesh(),
    }[name]
    v, f = np.round(mesh.vertices, 6), np.asarray(mesh.faces)
    if name == "open_box":
        f = f[2:]  # drop one side: non-watertight
    vol, com, inertia = body.legacy_mass_properties(v, f)
    mass, ipos, principal = _mujoco_mass(v, f)
    np.testing.assert_allclose(body.DENSITY * vol, mass, rtol=1e-9)
    np.testing.assert_allclose(com, ipos, atol=1e-9)
    np.testing.assert_allclose(body.DENSITY * np.linalg.eigvalsh(inertia), principal, rtol=1e-7)


def test_voxel_box_mass_properties_are_analytic():
    occ = shapes.box_occ((-0.25, -0.125, -0.5), (0.25, 0.125, 0.0), d=32)  # 16 x 8 x 16 voxels
    b = _body(occ)
    np.testing.assert_allclose(b["com"], [0.0, 0.0, -0.25], atol=1e-6)
    a, bb, c = 0.5, 0.25, 0.5  # box edges
    expect = np.sort([(bb**2 + c**2) / 12, (a**2 + c**2) / 12, (a**2 + bb**2) / 12])
    np.testing.assert_allclose(np.sort(b["inertia"]), expect, rtol=1e-5)
    assert float(b["zmin"]) == pytest.approx(-0.5 + 0.5 / 32 * (1 - _cfg().voxel_offset), abs=1e-6)
    assert float(b["mass"]) == pytest.approx(1000 * 0.5 * 0.25 * 0.5, rel=1e-6)
    assert bool(b["valid"])


def test_margin_sign_and_size():
    cfg = _cfg()
    cfg.voxel_offset = 1.0  # corners: the support polygon is the voxel footprint exactly
    occ = shapes.box_occ((-0.25, -0.125, -0.5), (0.25, 0.125, 0.0), d=32)
    b = _body(occ, cfg)
    assert float(b["margin"]) == pytest.approx(0.125, abs=1e-3)  # half the short side
    post = shapes.box_occ((-0.45, -0.1, -0.5), (-0.3, 0.1, 0.5), d=32)
    arm = shapes.box_occ((-0.45, -0.1, 0.3), (0.45, 0.1, 0.5), d=32)
    b = _body(post | arm, cfg)
    assert float(b["margin"]) < 0  # COM outside the post's footprint


def test_empty_grid_is_finite_and_invalid():
    b = jax.jit(lambda o: body.occupancy_body(o, _cfg()))(jnp.zeros((16, 16, 16), bool))
    for k, v in b.items():
        assert np.all(np.isfinite(np.asarray(v, float))), k
    assert not bool(b["valid"])


def test_occupancy_body_vmaps_and_accepts_floats():
    occ = np.stack(
        [
            shapes.box_occ((-0.3, -0.3, -0.3), (0.3, 0.3, 0.3), d=16),
            shapes.box_occ((-0.1, -0.1, -0.5), (0.1, 0.1, 0.5), d=16),
        ]
    )
    f = jax.jit(jax.vmap(lambda o: body.occupancy_body(o, _cfg())))
    b_bool = f(jnp.asarray(occ))
    b_float = f(jnp.asarray(occ, jnp.float32))
    assert b_bool["points"].shape == (2, _cfg().num_points, 3)
    np.testing.assert_allclose(b_bool["com"], b_float["com"])


def test_proxy_of_a_cube_is_its_corners_without_duplicates():
    cfg = _cfg()
    cfg.voxel_offset = 1.0
    occ = shapes.box_occ((-0.25, -0.25, -0.25), (0.25, 0.25, 0.25), d=16)
    b = _body(occ, cfg)
    pts = np.asarray(b["points"])
    com = np.asarray(b["com"])
    real = pts[np.any(np.abs(pts - com) > 1e-6, axis=1)]  # the rest are parked at the COM
    assert len(np.unique(np.round(real, 6), axis=0)) == len(real)
    np.testing.assert_allclose(np.abs(real[:, :2]), 0.25, atol=1e-6)  # every contact point is a corner
    assert np.sum(np.isclose(real[:, 2], -0.25)) == 4  # the 4 bottom corners: the whole base


@pytest.mark.parametrize("name", ["box", "tall_box", "wedge"])
def test_occupancy_and_mesh_bodies_agree_on_voxelised_primitives(name):
    mesh = {
        "box": shapes.box_mesh((0.6, 0.4, 0.5)),
        "tall_box": shapes.box_mesh((0.15, 0.2, 0.9)),
        "wedge": shapes.wedge_mesh(),
    }[name]
    cfg = _cfg()
    cfg.boundary_weight = 0.5  # the shell's voxels are half inside the surface
    d = 64
    v = np.asarray(mesh.vertices)
    mb = body.mesh_body(v - [0, 0, v[:, 2].min()], mesh.faces, cfg)
    occ = body.voxelize_mesh(v, mesh.faces, d)  # surface shell, filled by the occupancy path
    ob = _body(occ, cfg)
    shift = np.array([0, 0, v[:, 2].min()])
    h = 1.0 / d
    np.testing.assert_allclose(np.asarray(ob["com"]), mb["com"] + shift, atol=0.6 * h)
    np.testing.assert_allclose(np.sort(np.asarray(ob["inertia"])), np.sort(mb["inertia"]), rtol=0.05)
    assert float(ob["margin"]) == pytest.approx(mb["margin"], abs=1.5 * h)
