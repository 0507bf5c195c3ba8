"""Mesh construction and logical-axis resolution on the 8 simulated devices."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from t5x_lite import partitioning


def test_mesh_fills_the_free_axis():
  mesh = partitioning.make_mesh(data=-1, fsdp=2, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(partitioning.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("sizes, message", [
    (dict(data=3, fsdp=1, tensor=1), "multiple of 3 devices"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one -1"),
    (dict(data=2, fsdp=2, tensor=1), "set one axis to -1"),
    (dict(data=0, fsdp=1, tensor=1), "positive sizes"),
])
def test_bad_mesh_is_refused_with_the_fix(sizes, message):
  with pytest.raises(ValueError, match=message):
    partitioning.make_mesh(**sizes)


def test_parameters_split_over_fsdp_and_tensor_activations_over_batch():
  mesh = partitioning.make_mesh(2, 2, 2)
  mlp_in = partitioning.logical_to_sharding(P("embed", "mlp"), (64, 256), mesh)
  assert mlp_in.spec == P("fsdp", "tensor")
  scanned = partitioning.logical_to_sharding(P("layers", "embed", "mlp"), (4, 64, 256), mesh)
  assert scanned.spec == P(None, "fsdp", "tensor")
  activations = partitioning.logical_to_sharding(P("batch", "length", "embed"), (8, 16, 64), mesh)
  assert activations.spec == P(("data", "fsdp"), None, None)


def test_dimensions_the_mesh_does_not_divide_stay_whole():
  mesh = partitioning.make_mesh(2, 2, 2)
  single_kv_head = partitioning.logical_to_sharding(P("embed", "kv_heads", "kv"), (64, 1, 16), mesh)
  assert single_kv_head.spec == P("fsdp", None, None)
  byte_vocab = partitioning.logical_to_sharding(P("vocab", "embed"), (259, 64), mesh)
  assert byte_vocab.spec == P(None, "fsdp")
  odd_batch = partitioning.logical_to_sharding(P("batch", "length"), (2, 8), mesh)
  assert odd_batch.spec == P("data", None)
  assert jax.device_count() == 8
