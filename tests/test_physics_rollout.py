"""Occupancy -> verdict with MJX: physically right verdicts, purity (jit, vmap, nested jit), empty grids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_physics_shapes as shapes

from dso_jax.physics import body, mesh_io, rollout

D = 32


def _cfg():
    cfg = rollout.default_sim_config()
    cfg.horizon_s = 1.5  # every test object has settled or toppled well within this
    return cfg


SHAPES = {
    "cube": (shapes.box_occ((-0.3, -0.3, -0.3), (0.3, 0.3, 0.3), D), True),
    "tall_thin_box": (shapes.box_occ((-0.05, -0.05, -0.5), (0.05, 0.05, 0.5), D), True),
    "tall_box_past_tipping": (shapes.rotated_box_occ((0.2, 0.2, 0.8), 25.0, D), False),  # tips at 14 deg
    "tall_box_before_tipping": (shapes.rotated_box_occ((0.3, 0.3, 0.8), 12.0, D), True),  # rocks back: 12 deg
    "overhanging_l": (
        shapes.box_occ((-0.45, -0.1, -0.5), (-0.3, 0.1, 0.5), D)
        | shapes.box_occ((-0.45, -0.1, 0.3), (0.45, 0.1, 0.5), D),
        False,
    ),
    "short_l": (
        shapes.box_occ((-0.45, -0.2, -0.5), (-0.1, 0.2, 0.5), D)
        | shapes.box_occ((-0.45, -0.2, 0.3), (0.0, 0.2, 0.5), D),
        True,
    ),
}


def _voxelised(mesh):
    """A mesh prepared like DSO's eval (rescaled, min z = 0), voxelised as a surface shell in the grid frame."""
    m = mesh_io.prepare_mesh(mesh.vertices, mesh.faces, up_dir="z")
    return body.voxelize_mesh(body.mesh_to_grid_frame(m.vertices), m.faces, D)


# Voxelised meshes whose verdicts the reference test checks on the mesh itself: both paths must agree.
SHAPES.update(
    {
        "mesh_overhanging_l": (_voxelised(shapes.l_mesh(True)), False),
        "mesh_short_l": (_voxelised(shapes.l_mesh(False)), True),
        "mesh_box_past_tipping": (_voxelised(shapes.box_mesh((0.2, 0.2, 0.8), tilt_deg=25)), False),
        "mesh_wedge": (_voxelised(shapes.wedge_mesh()), True),
        "empty": (np.zeros((D, D, D), bool), False),
    }
)


@pytest.fixture(scope="module")
def both():
    """One compile for every test here: the verdict function vmapped over an extra axis inside an outer jit
    (as the training step would use it), on the shapes and on the shapes in reverse order."""
    fn = rollout.make_stability_fn(_cfg())

    @jax.jit
    def outer(x):
        out = jax.vmap(fn)(x)  # (2, B)
        return jnp.where(out["stable"], 1.0, -1.0), out

    occ = jnp.asarray(np.stack([s for s, _ in SHAPES.values()]))
    reward, out = outer(jnp.stack([occ, occ[::-1]]))
    return jax.device_get(reward), jax.device_get(out)


@pytest.fixture(scope="module")
def verdicts(both):
    return {k: v[0] for k, v in both[1].items()}


@pytest.mark.parametrize("name", list(SHAPES))
def test_physically_right_verdict(verdicts, name):
    i = list(SHAPES).index(name)
    assert bool(verdicts["stable"][i]) == SHAPES[name][1], {k: v[i] for k, v in verdicts.items()}


def test_outputs_are_finite_with_the_documented_keys(verdicts):
    assert set(verdicts) >= {"angle", "tilt", "stable", "margin", "valid"}
    for k, v in verdicts.items():
        assert v.shape == (len(SHAPES),), k
        assert np.all(np.isfinite(np.asarray(v, float))), k


def test_empty_grid_is_invalid_and_unstable(verdicts):
    i = list(SHAPES).index("empty")
    assert not verdicts["valid"][i] and not verdicts["stable"][i]
    assert verdicts["valid"][:i].all()


def test_stable_objects_barely_move(verdicts):
    for name in ("cube", "tall_thin_box"):
        i = list(SHAPES).index(name)
        assert verdicts["angle"][i] < 1.0 and verdicts["margin"][i] > 0


def test_pure_inside_another_jit_and_under_vmap(both):
    reward, out = both
    np.testing.assert_array_equal(reward[0], np.where(out["stable"][0], 1.0, -1.0))
    np.testing.assert_array_equal(out["stable"][0], out["stable"][1][::-1])  # order does not matter
    np.testing.assert_allclose(out["angle"][0], out["angle"][1][::-1], atol=1e-3)


def test_bad_shapes_raise():
    fn = rollout.make_stability_fn(_cfg())
    with pytest.raises(ValueError):
        fn(jnp.zeros((2, 8, 8, 4)))


def test_warp_backend_matches_jax_where_installed():
    pytest.importorskip("warp")  # optional backend: warp-lang (NVIDIA GPU; its CPU mode is slow but correct)
    cfg = _cfg()
    cfg.horizon_s = 0.3
    cfg.impl = "jax"
    occ = jnp.asarray(np.stack([SHAPES["cube"][0][::2, ::2, ::2], SHAPES["tall_box_past_tipping"][0][::2, ::2, ::2]]))
    out_jax = jax.device_get(jax.jit(rollout.make_stability_fn(cfg))(occ))
    cfg.impl = "warp"
    out_warp = jax.device_get(jax.jit(rollout.make_stability_fn(cfg))(occ))
    np.testing.assert_allclose(out_warp["angle"], out_jax["angle"], atol=0.05)


def test_auto_backend_is_warp_only_on_one_cuda_gpu_with_warp_installed(monkeypatch):
    assert rollout.default_sim_config().impl == "auto"
    assert rollout.resolve_impl("jax") == "jax" and rollout.resolve_impl("warp") == "warp"
    with pytest.raises(ValueError, match=r"^physics impl must be one of auto, jax, warp, got 'mjx'$"):
        rollout.resolve_impl("mjx")
    # this CPU: JAX, whether or not warp-lang is importable
    monkeypatch.setattr(rollout.importlib.util, "find_spec", lambda name: object() if name == "warp" else None)
    assert jax.default_backend() == "cpu" and rollout.resolve_impl("auto") == "jax"
    # a single CUDA device with warp-lang: Warp; without warp-lang: JAX
    monkeypatch.setattr(rollout.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(rollout.jax, "device_count", lambda: 1)
    monkeypatch.setattr(rollout.jax, "devices", lambda backend=None: ["cuda:0"])
    assert rollout.resolve_impl("auto") == "warp"
    monkeypatch.setattr(rollout.jax, "device_count", lambda: 2)  # a mesh of two GPUs keeps JAX
    monkeypatch.setattr(rollout.jax, "devices", lambda backend=None: ["cuda:0", "cuda:1"])
    assert rollout.resolve_impl("auto") == "jax"
    monkeypatch.setattr(rollout.jax, "device_count", lambda: 1)
    monkeypatch.setattr(rollout.jax, "devices", lambda backend=None: ["cuda:0"])
    monkeypatch.setattr(rollout.importlib.util, "find_spec", lambda name: None)
    assert rollout.resolve_impl("auto") == "jax"


def test_command_line_overrides_keep_types_and_name_bad_keys():
    base = rollout.default_sim_config()
    cfg = rollout.with_overrides(base, ["horizon_s=0.5", "num_points=32", "impl=warp", "fill_interior=false"])
    assert (cfg.horizon_s, cfg.num_points, cfg.impl, cfg.fill_interior) == (0.5, 32, "warp", False)
    assert isinstance(cfg.num_points, int) and base.num_points == 24  # a copy: the defaults stay
    with pytest.raises(ValueError, match=r"^--sim 'num_spheres=8': expected KEY=VALUE with KEY in \['base_tol'"):
        rollout.with_overrides(base, ["num_spheres=8"], flag="--sim")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        rollout.with_overrides(base, ["horizon_s"])


def test_mjx_import_is_quiet_about_warp_when_warp_is_not_used():
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("warp") is not None:
        pytest.skip("warp-lang is installed: MJX has nothing to complain about")
    code = "from dso_jax.physics import rollout; rollout.make_simulator(rollout.default_sim_config()); print('built')"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["built"]  # MJX's "Failed to import warp" lines are gone, nothing else is
    assert "warp" not in run.stderr


def test_sim_presets_are_reachable_from_the_command_line():
    import argparse

    parser = argparse.ArgumentParser()
    rollout.add_sim_args(parser, default_preset="occupancy")
    cfg = rollout.sim_config_from_args(parser.parse_args([]))
    assert cfg.to_dict() == rollout.default_sim_config().to_dict()
    cfg = rollout.sim_config_from_args(parser.parse_args(["--sim_preset", "mesh", "--sim", "horizon_s=3.0"]))
    want = rollout.mesh_sim_config()
    assert cfg.num_points == want.num_points != rollout.default_sim_config().num_points  # DSO's evaluation settings
    assert cfg.timestep == want.timestep and cfg.horizon_s == 3.0
    with pytest.raises(ValueError, match="--sim 'horizon=3'"):
        rollout.sim_config_from_args(parser.parse_args(["--sim", "horizon=3"]))
