"""Data parallelism over every device of every process: one mesh axis that shards the batch."""
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

BATCH_AXIS = 'data'


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over all devices (all processes), in auto-sharding mode for plain `jit`."""
  return jax.make_mesh((jax.device_count(),), (BATCH_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the devices."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, key: str = 'config.batch_size') -> None:
  """Every device must get the same number of examples."""
  if global_batch_size % jax.device_count():
    raise ValueError(f'{key}={global_batch_size} is not divisible by the '
                     f'{jax.device_count()} devices.')
