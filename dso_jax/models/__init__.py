"""Flax ports of TRELLIS's stage-1 models (and, separately, DINOv2)."""

from dso_jax.models.ss_decoder import SparseStructureDecoder, occupancy_from_logits
from dso_jax.models.ss_flow import SparseStructureFlowModel

__all__ = ["SparseStructureFlowModel", "SparseStructureDecoder", "occupancy_from_logits", "load_pretrained"]


def __getattr__(name):
    # load_pretrained pulls in file I/O and conversion; import it lazily to keep model imports light.
    if name == "load_pretrained":
        from dso_jax.models.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(name)
