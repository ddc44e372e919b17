"""Bad inputs give a one-line reason each and never stop the batch (both backends, and the CLI)."""

import json
import os

import numpy as np
import pytest
import test_physics_shapes as shapes
import trimesh
from helpers_cli import error_line, run_script

from dso_jax.physics import mesh_io, reference, rollout
from dso_jax.physics.metrics import STABLE_THRESHOLD_DEG


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
    assert reference.run_protocol(mesh.vertices, mesh.faces, duration=0.5)["angle"] < STABLE_THRESHOLD_DEG


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


def test_cli_writes_json_and_histogram(files, tmp_path):
    out = tmp_path / "res.json"
    argv = ["--mesh_paths", os.path.join(os.path.dirname(files["good"]), "*"), "--backend", "mujoco", "--workers", "1"]
    rc, stdout, _ = run_script("evaluate_stability", [*argv, "--out", out])
    assert rc == 0
    table = json.loads(out.read_text())
    assert table["good.glb"]["stable"] and "error" in table["corrupt.glb"] and "error" in table["huge.ply"]
    assert (tmp_path / "res_hist.png").exists()
    assert "Percentage Stable" in stdout


def test_cli_writes_nothing_unless_asked(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--mesh_paths", files["good"], "--backend", "mujoco", "--no_rescale"]  # the docstring's spelling
    rc, stdout, _ = run_script("evaluate_stability", argv)
    assert rc == 0 and "Percentage Stable (angle < 20)" in stdout
    assert os.listdir(tmp_path) == []  # the old default wrote results.json into the current directory


def test_cli_keys_same_named_files_by_relative_path(tmp_path):
    for d in ("a", "b"):
        (tmp_path / "gen" / d).mkdir(parents=True)
        shapes.box_mesh((0.5, 0.4, 0.3)).export(tmp_path / "gen" / d / "x-000_000.glb")
    out = tmp_path / "res.json"
    argv = ["--mesh_paths", tmp_path / "gen" / "*" / "*.glb", "--backend", "mujoco", "--workers", "1"]
    assert run_script("evaluate_stability", [*argv, "--out", out])[0] == 0
    assert sorted(json.loads(out.read_text())) == ["a/x-000_000.glb", "b/x-000_000.glb"]


def test_cli_fails_when_every_mesh_failed(files, tmp_path):
    argv = ["--mesh_paths", files["corrupt"], "--backend", "mujoco", "--out", tmp_path / "r.json"]
    rc, stdout, err = run_script("evaluate_stability", argv)
    assert rc == 2 and "all 1 meshes failed" in error_line(err)
    assert (
        "failed corrupt.glb: corrupt" in stdout
        and "error" in json.loads((tmp_path / "r.json").read_text())["corrupt.glb"]
    )


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--threshold", "-5"], "argument --threshold: invalid threshold in (0, 180] degrees value: '-5'"),
        (["--threshold", "nan"], "argument --threshold"),
        (["--sim", "nope=1", "--backend", "mjx"], "--sim 'nope=1': expected KEY=VALUE with KEY in"),
        (["--sim", "timestep=0.01", "--backend", "mujoco"], "--sim applies to --backend mjx"),
        (["--workers", "0"], "argument --workers: expected a positive integer, got '0'"),
    ],
)
def test_cli_bad_flags_are_one_line(files, extra, needle):
    rc, _, err = run_script("evaluate_stability", ["--mesh_paths", files["good"], *extra])
    assert rc == 2 and needle in error_line(err)


def test_cli_bad_destinations_and_globs_are_one_line(files, tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = {
        "no files match": ["--mesh_paths", tmp_path / "nothing*.glb"],
        "afile/r.json": ["--mesh_paths", files["good"], "--out", tmp_path / "afile" / "r.json"],
        "is a folder": ["--mesh_paths", files["good"], "--out", tmp_path],
    }
    for needle, argv in cases.items():
        rc, _, err = run_script("evaluate_stability", [*argv, "--backend", "mujoco"])
        assert rc == 2 and needle in error_line(err), (needle, err)
