"""Gaussian decoder read-out and the 3DGS .ply export (dso_jax.gaussians) against a PyTorch twin of TRELLIS."""

from __future__ import annotations

import numpy as np
import pytest
from twins import gaussian_twin as twin

from dso_jax import gaussians as gs

CFG = gs.RELEASED_GS_CONFIG
TOL = dict(rtol=1e-5, atol=1e-6)  # float32 on both sides


def _decoder_output(seed=0, counts=(5, 3), scale=2.0):
    """Random (coords (M, 4), feats (M, 448)) for objects with ``counts`` voxels each on the 64³ grid."""
    rng = np.random.default_rng(seed)
    coords = []
    for b, n in enumerate(counts):
        xyz = rng.choice(64**3, size=n, replace=False)
        coords.append(np.stack([np.full(n, b), xyz // 4096, xyz // 64 % 64, xyz % 64], 1))
    coords = np.concatenate(coords)
    return coords, (rng.normal(size=(len(coords), 448)) * scale).astype(np.float32)


def read_ply(path):
    """A minimal binary PLY reader: (format, element count, property names, (N, P) float32 data)."""
    with open(path, "rb") as f:
        assert f.readline() == b"ply\n"
        fmt, count, names = None, None, []
        while (line := f.readline().decode("ascii").strip()) != "end_header":
            kind, *rest = line.split()
            if kind == "format":
                fmt = rest[0]
            elif kind == "element":
                assert rest[0] == "vertex"
                count = int(rest[1])
            elif kind == "property":
                assert rest[0] == "float", line
                names.append(rest[1])
        data = np.frombuffer(f.read(), "<f4")
    return fmt, count, names, data.reshape(count, len(names))


def test_offset_perturbation_is_the_hammersley_set():
    p = gs.offset_perturbation(32, 1.5)
    assert p.shape == (32, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p[0], np.arctanh(-1 / 1.5), rtol=1e-6)  # h_0 = (0, 0, 0)
    np.testing.assert_allclose(p[1], np.arctanh((np.array([1 / 32, 1 / 2, 1 / 3]) * 2 - 1) / 1.5), rtol=1e-6)
    np.testing.assert_allclose(p[5], np.arctanh((np.array([5 / 32, 5 / 8, 7 / 9]) * 2 - 1) / 1.5), rtol=1e-6)
    np.testing.assert_allclose(p, twin.hammersley_perturbation(32, 1.5).numpy(), **TOL)


def test_gaussians_match_the_torch_twin():
    coords, feats = _decoder_output()
    ours, theirs = gs.gaussians_from_decoder(coords, feats), twin.to_gaussians(coords, feats, CFG)
    assert len(ours) == len(theirs) == 2
    for o, t, n in zip(ours, theirs, (5, 3)):
        assert o["xyz"].shape == (n * 32, 3) and o["rotation"].shape == (n * 32, 4) and o["opacity"].shape == (n * 32,)
        for key in ("xyz", "features_dc", "scaling", "rotation", "opacity"):
            np.testing.assert_allclose(o[key], t[key], err_msg=key, **TOL)


def test_exp_scaling_and_no_perturbation_match_the_twin():
    cfg = dict(CFG, scaling_activation="exp", perturb_offset=False, num_gaussians=4, resolution=32)
    coords, feats = _decoder_output(counts=(4,))
    coords[:, 1:] //= 2
    feats = feats[:, : 14 * 4]
    for key in ("xyz", "scaling"):
        np.testing.assert_allclose(
            gs.gaussians_from_decoder(coords, feats, cfg)[0][key], twin.to_gaussians(coords, feats, cfg)[0][key], **TOL
        )


def test_zero_output_gives_the_configured_biases():
    coords = np.array([[0, 10, 20, 30]])
    g = gs.gaussians_from_decoder(coords, np.zeros((1, 448), np.float32))[0]
    np.testing.assert_allclose(g["scaling"], np.hypot(4e-3, 9e-4), rtol=1e-5)  # scaling_bias, 3-D filter
    np.testing.assert_allclose(g["opacity"], 0.1, rtol=1e-5)
    np.testing.assert_allclose(g["rotation"], np.tile([1, 0, 0, 0], (32, 1)), atol=0)
    centre = (np.array([10, 20, 30]) + 0.5) / 64 - 0.5
    offset = np.tanh(gs.offset_perturbation(32, 1.5)) / 64 * 0.75
    np.testing.assert_allclose(g["xyz"], centre + offset, atol=1e-7)


def test_centres_stay_within_three_quarters_of_a_voxel():
    coords, feats = _decoder_output(scale=50.0)  # saturate tanh
    for b, g in enumerate(gs.gaussians_from_decoder(coords, feats)):
        centre = np.repeat((coords[coords[:, 0] == b, 1:] + 0.5) / 64 - 0.5, 32, axis=0)
        assert np.abs(g["xyz"] - centre).max() <= 0.75 / 64 + 1e-7


def test_save_ply_writes_trellis_rows_in_the_3dgs_layout(tmp_path):
    coords, feats = _decoder_output(counts=(6,))
    g = gs.gaussians_from_decoder(coords, feats)[0]
    path = gs.save_ply(str(tmp_path / "sub" / "g.ply"), g)
    fmt, count, names, data = read_ply(path)
    assert fmt == "binary_little_endian" and count == 6 * 32
    assert (
        names == "x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3".split()
    )
    expected = twin.ply_rows_default_transform(g)
    np.testing.assert_allclose(data[:, :13], expected[:, :13], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data[:, 13:], expected[:, 13:], atol=1e-5)  # same sign convention too
    np.testing.assert_allclose(data[:, [0, 1, 2]], g["xyz"][:, [0, 2, 1]] * [1, -1, 1], atol=1e-7)  # z-up -> y-up
    assert not (tmp_path / "sub" / "g.ply.tmp").exists()


def test_save_ply_without_transform_keeps_the_native_frame(tmp_path):
    coords, feats = _decoder_output(counts=(2,))
    g = gs.gaussians_from_decoder(coords, feats)[0]
    _, _, _, data = read_ply(gs.save_ply(str(tmp_path / "g.ply"), g, transform=None))
    np.testing.assert_allclose(data[:, :3], g["xyz"], atol=0)
    np.testing.assert_allclose(data[:, 13:], g["rotation"], atol=0)
    np.testing.assert_allclose(data[:, 9], np.log(g["opacity"] / (1 - g["opacity"])), rtol=1e-5)
    np.testing.assert_allclose(data[:, 10:13], np.log(g["scaling"]), rtol=1e-6)


def test_ply_opens_in_trimesh(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    coords, feats = _decoder_output(counts=(3,))
    g = gs.gaussians_from_decoder(coords, feats)[0]
    cloud = trimesh.load(gs.save_ply(str(tmp_path / "g.ply"), g, transform=None))
    np.testing.assert_allclose(np.asarray(cloud.vertices), g["xyz"], atol=1e-7)


@pytest.mark.parametrize(
    "coords, feats, match",
    [
        (np.zeros((2, 4), int), np.zeros((2, 447), np.float32), r"feats must be \(M, 448\)"),
        (np.zeros((2, 3), int), np.zeros((2, 448), np.float32), r"coords must be \(M, 4\)"),
        (np.array([[0, 1, 2, 64]]), np.zeros((1, 448), np.float32), "x, y, z < 64"),
    ],
)
def test_bad_input_names_the_problem(coords, feats, match):
    with pytest.raises(ValueError, match=match):
        gs.gaussians_from_decoder(coords, feats)
