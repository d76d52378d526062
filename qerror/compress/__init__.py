"""Model and data size reduction, and the honest byte counting that compares them."""

from qerror.compress.size import StorageFormat, held_bytes, packed_bytes, storage_bytes

__all__ = ["StorageFormat", "held_bytes", "packed_bytes", "storage_bytes"]
