"""Bad inputs give a one-line reason each and never stop the batch (both backends, and the CLI)."""

import json
import os
import runpy
import sys

import numpy as np
import pytest
import test_physics_shapes as shapes
import trimesh

from dso_jax.physics import mesh_io, reference, rollout


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("meshes")
    out = {}
    out["good"] = d / "good.glb"
    shapes.box_mesh((0.5, 0.4, 0.3)).export(out["good"])
    out["missing"] = d / "missing.glb"
    out["corrupt"] = d / "corrupt.glb"
    out["corrupt"].write_bytes(b"glTF\x02\x00\x00\x00garbage" * 10)
    out["empty"] = d / "empty.obj"
    out["empty"].write_text("# nothing here\n")
    out["point_cloud"] = d / "cloud.ply"
    trimesh.PointCloud(np.random.default_rng(0).random((100, 3))).export(out["point_cloud"])
    out["degenerate"] = d / "flat.obj"
    trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]]).export(out["degenerate"])
    out["open"] = d / "open.obj"
    box = shapes.box_mesh((0.5, 0.4, 0.3))
    trimesh.Trimesh(box.vertices, box.faces[2:], process=False).export(out["open"])
    out["huge"] = d / "huge.ply"
    rng = np.random.default_rng(0)
    trimesh.Trimesh(rng.random((2000, 3)), rng.integers(0, 2000, (1_000_000, 3)), process=False).export(out["huge"])
    return {k: str(v) for k, v in out.items()}


FAILS = {
    "missing": "missing file",
    "corrupt": "corrupt",
    "empty": "empty",
    "point_cloud": "point cloud",
    "degenerate": "degenerate",
    "huge": "too many faces",
}


@pytest.mark.parametrize("name", list(FAILS))
def test_loader_reason(files, name):
    with pytest.raises(mesh_io.MeshError) as err:
        mesh_io.load_and_prepare(files[name])
    assert FAILS[name] in str(err.value) and "\n" not in str(err.value)


def test_non_watertight_is_simulated_with_a_warning(files):
    mesh = mesh_io.load_and_prepare(files["open"])
    assert not mesh.watertight and mesh.warnings
    assert reference.simulate_mesh(mesh.vertices, mesh.faces, duration=0.5) < 20


def _check(names, results):
    for name, res in zip(names, results):
        if name in FAILS:
            assert FAILS[name] in res["error"] and "\n" not in res["error"], (name, res)
        else:
            assert res["angle"] < 20, (name, res)
    assert "warning" in results[names.index("open")]


def test_reference_batch_completes(files):
    names = list(files)
    _check(names, reference.evaluate_files([files[n] for n in names], workers=1))


def test_mjx_batch_completes(files):
    names = list(files)
    _check(
        names,
        rollout.evaluate_files(
            [files[n] for n in names],
            rollout.mesh_sim_config(),
            batch_size=shapes.MESH_BATCH,
            simulate=shapes.mesh_simulator(),
        ),
    )


def test_cli_writes_json_and_histogram(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "res.json"
    argv = [
        "evaluate_stability.py",
        "--mesh_paths",
        os.path.join(os.path.dirname(files["good"]), "*"),
        "--backend",
        "mujoco",
        "--workers",
        "1",
        "--out",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(
        os.path.join(os.path.dirname(__file__), "..", "scripts", "evaluate_stability.py"), run_name="__main__"
    )
    table = json.loads(out.read_text())
    assert table["good.glb"]["stable"] and "error" in table["corrupt.glb"] and "error" in table["huge.ply"]
    assert (tmp_path / "res_hist.png").exists()
    assert "Percentage Stable" in capsys.readouterr().out
