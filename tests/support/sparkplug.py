"""Sparkplug B payloads for tests, written with Google's protobuf runtime (an independent writer).

The schema is declared here with the field numbers and types of Eclipse Tahu's
``sparkplug_b.proto`` (Payload: timestamp 1, metrics 2, seq 3; Metric: name 1, alias 2,
timestamp 3, datatype 4, is_null 7, int_value 10, long_value 11, float_value 12,
double_value 13, boolean_value 14, string_value 15), see tests/data/sparkplug/README.md.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["BOOLEAN", "DOUBLE", "FLOAT", "INT32", "INT64", "STRING", "Payload", "spb"]

INT32: Final = 3
INT64: Final = 4
FLOAT: Final = 9
DOUBLE: Final = 10
BOOLEAN: Final = 11
STRING: Final = 12

_T = descriptor_pb2.FieldDescriptorProto


def _payload_class() -> Any:
    file = descriptor_pb2.FileDescriptorProto(name="spb_support.proto", package="spbsupport")
    payload = file.message_type.add(name="Payload")
    for name, number, kind in (("timestamp", 1, _T.TYPE_UINT64), ("seq", 3, _T.TYPE_UINT64)):
        payload.field.add(name=name, number=number, type=kind, label=_T.LABEL_OPTIONAL)
    payload.field.add(
        name="metrics",
        number=2,
        type=_T.TYPE_MESSAGE,
        type_name=".spbsupport.Payload.Metric",
        label=_T.LABEL_REPEATED,
    )
    metric = payload.nested_type.add(name="Metric")
    for name, number, kind in (
        ("name", 1, _T.TYPE_STRING),
        ("alias", 2, _T.TYPE_UINT64),
        ("timestamp", 3, _T.TYPE_UINT64),
        ("datatype", 4, _T.TYPE_UINT32),
        ("is_null", 7, _T.TYPE_BOOL),
        ("int_value", 10, _T.TYPE_UINT32),
        ("long_value", 11, _T.TYPE_UINT64),
        ("float_value", 12, _T.TYPE_FLOAT),
        ("double_value", 13, _T.TYPE_DOUBLE),
        ("boolean_value", 14, _T.TYPE_BOOL),
        ("string_value", 15, _T.TYPE_STRING),
    ):
        metric.field.add(name=name, number=number, type=kind, label=_T.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("spbsupport.Payload"))


Payload: Final = _payload_class()
"""The generated ``Payload`` message class."""


def spb(*metrics: dict[str, Any], timestamp: int | None = None, seq: int | None = None) -> bytes:
    """A serialized Payload; each metric a dict of Metric fields.

    The fields are ``name``, ``alias``, ``timestamp``, ``datatype``, ``int_value``,
    ``float_value`` ...
    """
    message = Payload()
    if timestamp is not None:
        message.timestamp = timestamp
    if seq is not None:
        message.seq = seq
    for metric in metrics:
        message.metrics.add(**metric)
    return bytes(message.SerializeToString())
