"""A tf.data iterator checkpoint read and advanced in place, for tools/benchmark_resume.py.

What a restore costs at step N depends on the state's size (its buffers, bounded) and on its RNG
counters: TF restores a shuffle or `Dataset.random` by drawing again every sample it had drawn
(measured: ~12-15 ns a draw on a loaded 2-core EPYC; seqio's shuffle draws once per example, so
stdlib_clm at batch 32 draws ~32 per step). Making a real state at step 10^6 takes the 10^6-batch
replay, so `advance` makes one from the state at a step it could replay: the same buffers, with
every counter that grows with the step (RNG draws, shuffle slice bounds, the skip count)
moved on to where the run would have it at the target step. Its restore does the work a real one
at that step does (same buffer sizes, same draws to redo); its batches are not the real ones.

The format read here is TF's own (TensorBundle of a variant holding one VariantTensorData per
iterator, each a snappy-compressed CompressedElement of its saved scalars and tensors); an
unexpected layout raises ValueError, and the benchmark then reports n/a.
"""
from __future__ import annotations

import re
import struct

import tensorflow as tf
from google.protobuf.internal import decoder
from tensorflow.core.framework import tensor_pb2

KEY = "iterator/.ATTRIBUTES/ITERATOR_STATE"
# Saved scalars that grow with the position, per iterator kind (those advanced).
GROWING = {"Shuffle": ("num_random_samples", "slices_start_0", "slices_end_0"),
           "Random": ("num_random_samples",), "FiniteSkip": ("i",)}
# (A repeat's epoch count is not advanced: it names the iterators below it, so those would no
# longer match the pipeline; it is a number to restore whatever its value.)


def _unsnappy(data: bytes) -> bytes:
  """Snappy block decompression (literals and back-references)."""
  size, i = decoder._DecodeVarint(data, 0)  # pylint: disable=protected-access
  out = bytearray()
  while i < len(data):
    tag, kind = data[i], data[i] & 3
    i += 1
    if kind == 0:
      length = tag >> 2
      if length >= 60:
        extra = length - 59
        length, i = int.from_bytes(data[i:i + extra], "little"), i + extra
      out += data[i:i + length + 1]
      i += length + 1
      continue
    if kind == 1:
      length, offset, i = 4 + ((tag >> 2) & 7), ((tag >> 5) << 8) | data[i], i + 1
    else:
      width = 2 if kind == 2 else 4
      length, offset = (tag >> 2) + 1, int.from_bytes(data[i:i + width], "little")
      i += width
    for _ in range(length):
      out.append(out[-offset])
  if len(out) != size:
    raise ValueError(f"snappy block decoded to {len(out)} bytes, expected {size}")
  return bytes(out)


def _snappy_literal(raw: bytes) -> bytes:
  """`raw` as a valid snappy block of literals only (no compression)."""
  out = bytearray(_varint(len(raw)))
  for start in range(0, len(raw), 256):
    chunk = raw[start:start + 256]
    out += bytes([60 << 2, len(chunk) - 1]) + chunk if len(chunk) > 60 else bytes(
        [(len(chunk) - 1) << 2]) + chunk
  return bytes(out)


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
    n >>= 7
    if not n:
      return bytes(out)


def read_parts(prefix: str) -> list:
  """The VariantTensorDataProto of each iterator in the checkpoint `prefix`."""
  state = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[KEY], shape_and_slices=[""],
                               dtypes=[tf.variant])[0]
  # A variant tensor does not serialize to protos from Python; the bundle's data file holds
  # each element as varint length + VariantTensorDataProto + crc32, in order.
  with open(prefix + ".data-00000-of-00001", "rb") as f:
    data = f.read()
  count = int(tf.size(state))
  for start in range(64):
    parts, offset = [], start
    while len(parts) < count and offset < len(data):
      length, body = decoder._DecodeVarint(data, offset)  # pylint: disable=protected-access
      proto = tensor_pb2.VariantTensorDataProto()
      try:
        proto.ParseFromString(data[body:body + length])
      except Exception:  # pylint: disable=broad-except
        break
      if proto.type_name != "tensorflow::Iterator":
        break
      parts.append(proto)
      offset = body + length + 4
    if len(parts) == count:
      return parts
  raise ValueError(f"{prefix}: could not read the {count} iterator parts of its state")


def _scalars(part):
  """(iterator name, [saved key names], int64 values, CompressedElement proto) of one part."""
  # metadata: b"<iterator>@@<key>@@<key>...", a key plain ("num_random_samples") or
  # "<hash>|<iterator>:<key>".
  fields = part.metadata.decode("utf-8", "replace").split("@@")
  name = fields[0]
  names = [f.rsplit("|", 1)[-1].rsplit(":", 1)[-1] if "|" in f else f for f in fields[1:]]
  element = part.tensors[0].variant_val[0]
  length, start = decoder._DecodeVarint(element.metadata, 1)  # pylint: disable=protected-access
  if element.metadata[:1] != b"\n":
    raise ValueError(f"{name}: unexpected CompressedElement layout")
  raw = _unsnappy(element.metadata[start:start + length])
  return name, names, raw, (element, start + length)


def counters(prefix: str) -> dict[str, dict[str, int]]:
  """The growing counters (GROWING) of each iterator in the checkpoint."""
  found = {}
  for part in read_parts(prefix):
    name, names, raw, _ = _scalars(part)
    kind = re.sub(r"\[\d+\]$", "", name.rsplit("::", 1)[-1])
    if kind in GROWING:
      n = min(len(names), len(raw) // 8)  # the int64 scalars come first, in key order
      values = dict(zip(names, struct.unpack(f"<{n}q", raw[:8 * n])))
      found[name] = {k: values[k] for k in GROWING[kind] if k in values}
  return found


def advance(prefix: str, factor: float) -> tf.Tensor:
  """The iterator state of `prefix` with every growing counter multiplied by `factor` (a state
  at step N * factor made from the one at step N), as the variant DeserializeIterator takes."""
  parts = read_parts(prefix)
  for part in parts:
    name, names, raw, (element, end) = _scalars(part)
    kind = re.sub(r"\[\d+\]$", "", name.rsplit("::", 1)[-1])
    if kind not in GROWING:
      continue
    n = min(len(names), len(raw) // 8)
    names, values = names[:n], list(struct.unpack(f"<{n}q", raw[:8 * n]))
    grow = [i for i, k in enumerate(names) if k in GROWING[kind]]
    if kind == "Shuffle" and values[names.index("end_of_input_sequence")] == 1:
      continue  # a shuffle whose input ends every epoch (the file list): its counters restart
    if kind == "Shuffle":
      # The slice bounds move by as many elements as the draws (one per element produced).
      delta = int(values[grow[0]] * (factor - 1))
      for i in grow:
        values[i] += delta
    else:
      for i in grow:
        values[i] = int(values[i] * factor)
    new = struct.pack(f"<{n}q", *values) + raw[8 * n:]
    packed = _snappy_literal(new)
    element.metadata = b"\n" + _varint(len(packed)) + packed + element.metadata[end:]
  proto = tensor_pb2.TensorProto(dtype=tf.variant.as_datatype_enum)
  proto.tensor_shape.dim.add().size = len(parts)
  proto.variant_val.extend(parts)
  return tf.io.parse_tensor(proto.SerializeToString(), tf.variant)


def restore_variant(iterator, state: tf.Tensor) -> None:
  """Restores a tf.data iterator (an OwnedIterator) from a state variant."""
  # pylint: disable-next=protected-access
  tf.raw_ops.DeserializeIterator(resource_handle=iterator._iterator_resource,
                                 serialized=state)
