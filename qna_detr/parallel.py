"""Data parallelism over every device of every process: one mesh axis that shards the batch."""
from typing import Optional, Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

BATCH_AXIS = 'data'


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes), in auto-sharding
  mode so that plain `jit` with shardings partitions the step."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (BATCH_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the devices."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, key: str = 'config.batch_size') -> None:
  """Every device must get the same number of examples, at least one."""
  if global_batch_size < 1:
    raise ValueError(f'{key}={global_batch_size} must be >= 1.')
  if global_batch_size % jax.device_count():
    raise ValueError(f'{key}={global_batch_size} is not divisible by the '
                     f'{jax.device_count()} devices.')
