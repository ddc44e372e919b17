"""Device mesh and partition rules for training.

The mesh has two named axes, ``data`` and ``fsdp``. The batch is split over both (every device
sees different pairs, as in ZeRO-3); parameters are replicated over ``data`` and, when
``fsdp > 1``, each large array is split along its largest axis divisible by the ``fsdp`` size.
The frozen base weights, the LoRA overlay and the optimizer state all follow the same rule.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2**14  # arrays with fewer elements stay replicated


def maybe_initialize_distributed(mesh_cfg) -> None:
    """``jax.distributed.initialize()`` (cluster auto-detection) when ``mesh.distributed`` is set."""
    if mesh_cfg.distributed:
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A ('data', 'fsdp') mesh; one of the two sizes may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of mesh.data, mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(f"mesh: mesh.data={mesh_cfg.data} x mesh.fsdp={mesh_cfg.fsdp} does not tile {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Split axis ``batch_axis`` over every device (data x fsdp); other axes are whole."""
    return NamedSharding(mesh, P(*([None] * batch_axis), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """Shard the largest axis divisible by ``fsdp_size``; replicate small or indivisible arrays."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(tree, mesh: Mesh, min_size: int = FSDP_MIN_SIZE):
    """NamedShardings for a pytree of arrays or ``jax.ShapeDtypeStruct``s by the fsdp rule."""
    size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, size, min_size)), tree)


def with_shardings(abstract_tree, shardings):
    """``ShapeDtypeStruct``s carrying their target sharding (for orbax restore and jit outputs)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def host_to_global(local_batch: dict, mesh: Mesh, batch_axis: int) -> dict:
    """Assemble process-local numpy arrays into global arrays split over the batch axes."""
    sharding = batch_sharding(mesh, batch_axis)

    def put(x):
        x = np.asarray(x)
        global_shape = list(x.shape)
        global_shape[batch_axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

    return {k: put(v) for k, v in local_batch.items()}
