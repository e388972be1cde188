"""TensorFlow's checkpoint messages (tensor bundle header and entries, the ``checkpoint`` state
file), as message classes of the protobuf package: TensorFlow itself is not needed.

>>> BundleEntryProto.FromString(BundleEntryProto(dtype=1, offset=8).SerializeToString()).offset
8
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

# The messages TensorFlow writes, as its .proto files define them (same package, names, field
# numbers and proto3 syntax), built in a private pool so that they cannot clash with TensorFlow's
# own if it is imported too.
_SCHEMA = """
name: "jstate/tensorflow_checkpoint.proto"  package: "tensorflow"  syntax: "proto3"
# tensorflow/core/framework/versions.proto
message_type {
  name: "VersionDef"
  field { name: "producer" number: 1 type: TYPE_INT32 }
  field { name: "min_consumer" number: 2 type: TYPE_INT32 }
  field { name: "bad_consumers" number: 3 type: TYPE_INT32 label: LABEL_REPEATED }
}
# tensorflow/core/framework/tensor_shape.proto
message_type {
  name: "TensorShapeProto"
  nested_type {
    name: "Dim"
    field { name: "size" number: 1 type: TYPE_INT64 }
    field { name: "name" number: 2 type: TYPE_STRING }
  }
  field { name: "dim" number: 2 type: TYPE_MESSAGE type_name: "Dim" label: LABEL_REPEATED }
  field { name: "unknown_rank" number: 3 type: TYPE_BOOL }
}
# tensorflow/core/framework/tensor_slice.proto
message_type {
  name: "TensorSliceProto"
  nested_type {
    name: "Extent"
    field { name: "start" number: 1 type: TYPE_INT64 }
    field { name: "length" number: 2 type: TYPE_INT64 oneof_index: 0 }
    oneof_decl { name: "has_length" }
  }
  field { name: "extent" number: 1 type: TYPE_MESSAGE type_name: "Extent" label: LABEL_REPEATED }
}
# tensorflow/core/protobuf/tensor_bundle.proto
message_type {
  name: "BundleHeaderProto"
  enum_type { name: "Endianness" value { name: "LITTLE" number: 0 } value { name: "BIG" number: 1 } }
  field { name: "num_shards" number: 1 type: TYPE_INT32 }
  field { name: "endianness" number: 2 type: TYPE_ENUM type_name: "Endianness" }
  field { name: "version" number: 3 type: TYPE_MESSAGE type_name: "VersionDef" }
}
message_type {
  name: "BundleEntryProto"
  # TF's DataType enum, as the int32 it is on the wire: a dtype this copy does not name still parses
  field { name: "dtype" number: 1 type: TYPE_INT32 }
  field { name: "shape" number: 2 type: TYPE_MESSAGE type_name: "TensorShapeProto" }
  field { name: "shard_id" number: 3 type: TYPE_INT32 }
  field { name: "offset" number: 4 type: TYPE_INT64 }
  field { name: "size" number: 5 type: TYPE_INT64 }
  field { name: "crc32c" number: 6 type: TYPE_FIXED32 }
  field { name: "slices" number: 7 type: TYPE_MESSAGE type_name: "TensorSliceProto" label: LABEL_REPEATED }
}
# tensorflow/python/training/checkpoint_state.proto
message_type {
  name: "CheckpointState"
  field { name: "model_checkpoint_path" number: 1 type: TYPE_STRING }
  field { name: "all_model_checkpoint_paths" number: 2 type: TYPE_STRING label: LABEL_REPEATED }
  field { name: "all_model_checkpoint_timestamps" number: 3 type: TYPE_DOUBLE label: LABEL_REPEATED }
  field { name: "last_preserved_timestamp" number: 4 type: TYPE_DOUBLE }
}
"""
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(text_format.Parse(_SCHEMA, descriptor_pb2.FileDescriptorProto()))
BundleHeaderProto, BundleEntryProto, CheckpointState = (
    message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"tensorflow.{name}"))
    for name in ("BundleHeaderProto", "BundleEntryProto", "CheckpointState")
)
