"""The device mesh, multi-host start-up and the batch sharding.

Axes ``('data', 'fsdp', 'tensor', 'expert')`` (``kda_jax.models.sharding.MESH_AXES``) with sizes
from ``MeshConfig``; one size may be -1 and takes the remaining devices. Axes are
``AxisType.Auto`` (GSPMD). The batch is sharded over ``data × fsdp``; each process feeds its
own rows (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding

from kda_jax.models.sharding import MESH_AXES, logical_to_mesh


def maybe_initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` when the environment describes a multi-process job.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``), SLURM
    and Open MPI launches, which ``jax.distributed.initialize`` reads itself.
    """
    env = os.environ
    multi = ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    return multi


def mesh_shape(config, num_devices: int) -> tuple[int, ...]:
    sizes = [getattr(config, a) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot fill mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"there are {num_devices}")
    return tuple(sizes)


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh(("batch", "length")))


def global_batch(local_batch: dict, mesh) -> dict:
    """Assemble the global, sharded batch from this process's rows."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
