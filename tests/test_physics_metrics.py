"""Metrics: DSO's rotation angle and geometry metrics."""

import json

import numpy as np
import test_physics_shapes as shapes
from helpers_cli import error_line, run_script

from dso_jax.physics import metrics


def test_rotation_angle_is_total_rotation_including_yaw():
    half = np.deg2rad(30) / 2
    yaw30 = np.array([np.cos(half), 0, 0, np.sin(half)])
    tilt30 = np.array([np.cos(half), np.sin(half), 0, 0])
    angles = np.asarray(metrics.rotation_angle_deg(np.stack([[1.0, 0, 0, 0], yaw30, tilt30, 2 * tilt30])))
    np.testing.assert_allclose(angles, [0, 30, 30, 30], atol=1e-3)
    assert np.isfinite(metrics.rotation_angle_deg(np.array([1.0 + 1e-7, 0, 0, 0])))


def test_identical_meshes_score_perfectly():
    m = shapes.box_mesh((0.3, 0.6, 0.9))
    res = metrics.chamfer_fscore(m.vertices, m.faces, m.vertices, m.faces, n_points=2000, seed=0)
    assert res["fscore"] > 0.99 and res["chamfer"] < 0.02


def test_icp_undoes_a_small_rotation():
    m = shapes.box_mesh((0.3, 0.6, 0.9))
    t = np.deg2rad(3)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    raw = metrics.chamfer_fscore(m.vertices @ rot.T, m.faces, m.vertices, m.faces, n_points=2000, align=False)
    icp = metrics.chamfer_fscore(m.vertices @ rot.T, m.faces, m.vertices, m.faces, n_points=2000, align=True)
    assert icp["chamfer"] < raw["chamfer"]


def test_geometry_files_report_missing_ground_truth(tmp_path):
    m = shapes.box_mesh((0.3, 0.6, 0.9))
    (tmp_path / "gt" / "cat").mkdir(parents=True)
    m.export(tmp_path / "gt" / "cat" / "abc.glb")
    m.export(tmp_path / "abc-000_000.glb")
    m.export(tmp_path / "zzz-000_000.glb")
    res = metrics.evaluate_geometry_files(
        [str(tmp_path / "abc-000_000.glb"), str(tmp_path / "zzz-000_000.glb")], str(tmp_path / "gt"), n_points=1000
    )
    assert res[0]["fscore"] > 0.9
    assert "error" in res[1] and "\n" not in res[1]["error"]


def test_geometry_cli_keys_by_relative_path_and_refuses_a_missing_ground_truth_folder(tmp_path):
    m = shapes.box_mesh((0.3, 0.6, 0.9))
    (tmp_path / "gt" / "cat").mkdir(parents=True)
    m.export(tmp_path / "gt" / "cat" / "abc.glb")
    for run in ("base", "lora"):  # DSO's eval layout: the same file name under two folders
        (tmp_path / run).mkdir()
        m.export(tmp_path / run / "abc-000_000.glb")
    out = tmp_path / "geo.json"
    argv = ["--mesh_paths", tmp_path / "*" / "abc-*.glb", "--n_points", "500"]
    rc, stdout, _ = run_script("evaluate_geometry", [*argv, "--ground_truth_paths", tmp_path / "gt", "--out", out])
    assert rc == 0 and "Evaluated 2 of 2 meshes" in stdout
    result = json.loads(out.read_text())
    assert sorted(result["meshes"]) == ["base/abc-000_000.glb", "lora/abc-000_000.glb"]  # two rows, not one
    assert result["summary"]["count"] == 2
    rc, _, err = run_script("evaluate_geometry", [*argv, "--ground_truth_paths", tmp_path / "no_gt"])
    assert rc == 2 and "ground truth folder" in error_line(err) and "no_gt: no such directory" in error_line(err)


def test_geometry_cli_fails_when_every_mesh_failed_and_validates_flags(tmp_path):
    (tmp_path / "gt").mkdir()
    shapes.box_mesh((0.3, 0.6, 0.9)).export(tmp_path / "zzz-000_000.glb")  # no ground truth for zzz
    argv = ["--mesh_paths", tmp_path / "*.glb", "--ground_truth_paths", tmp_path / "gt"]
    rc, stdout, err = run_script("evaluate_geometry", argv)
    assert rc == 2 and "all 1 meshes failed" in error_line(err) and "ground truth for 'zzz'" in stdout
    rc, _, err = run_script("evaluate_geometry", [*argv, "--n_points", "0"])
    assert rc == 2 and "argument --n_points: expected a positive integer" in error_line(err)
