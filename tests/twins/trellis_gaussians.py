"""TRELLIS's own Gaussian read-out (``SLatGaussianDecoder.to_representation`` + ``Gaussian``) run from a fetched
checkout on the CPU (test-only).

The decoder class is imported with its transformer base stubbed (only the read-out methods are called, on a
stand-in ``self``); ``Gaussian`` is built with ``device='cpu'`` and ``Tensor.cuda`` made a no-op while it runs,
since TRELLIS's ``setup_functions`` moves its biases to CUDA unconditionally.
"""

from __future__ import annotations

import functools
import sys
import types
from unittest import mock

import numpy as np

from .trellis_import import stub, trellis_modules


def trellis_gaussians(trellis_src: str):
    """A function ``(coords (M, 4), feats (M, 448), rep_config, resolution) -> list of dicts`` of TRELLIS's
    ``get_xyz``, ``_features_dc``, ``get_scaling``, ``get_rotation``, ``get_opacity`` per batch index."""
    import torch

    with trellis_modules(trellis_src):
        from trellis.representations.gaussian.gaussian_model import Gaussian

        sys.modules["trellis.representations"].Gaussian = functools.partial(Gaussian, device="cpu")
        stub("trellis.models.structured_latent_vae.base", SparseTransformerBase=type("Base", (), {}))
        stub("trellis.models.sparse_elastic_mixin", SparseTransformerElasticMixin=type("Mixin", (), {}))
        from trellis.models.structured_latent_vae.decoder_gs import SLatGaussianDecoder

    def run(coords, feats, rep_config, resolution):
        coords_t = torch.from_numpy(np.asarray(coords, np.int64))
        batches = int(coords_t[:, 0].max()) + 1
        this = types.SimpleNamespace(rep_config=rep_config, resolution=resolution, device="cpu")
        this.register_buffer = lambda name, value: setattr(this, name, value)
        SLatGaussianDecoder._calc_layout(this)
        SLatGaussianDecoder._build_perturbation(this)
        order = torch.argsort(coords_t[:, 0], stable=True)  # SparseTensor keeps batches contiguous
        counts = torch.bincount(coords_t[:, 0], minlength=batches).tolist()
        starts = np.cumsum([0] + counts)
        x = types.SimpleNamespace(
            coords=coords_t[order],
            feats=torch.from_numpy(np.asarray(feats, np.float32))[order],
            layout=[slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])],
            shape=(batches,),
        )
        with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self), torch.no_grad():
            reps = SLatGaussianDecoder.to_representation(this, x)
            return [
                dict(
                    xyz=r.get_xyz.numpy(),
                    features_dc=r._features_dc.reshape(-1, 3).numpy(),
                    scaling=r.get_scaling.numpy(),
                    rotation=r.get_rotation.numpy(),
                    opacity=r.get_opacity.reshape(-1).numpy(),
                    perturbation=this.offset_perturbation.numpy(),
                )
                for r in reps
            ]

    return run
