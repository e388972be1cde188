"""LevelDB's table format, read by hand for TensorFlow's checkpoint index.

Written by hand because no dependency reads it (the alternative is TensorFlow itself). The
format: a footer pointing to an index block, whose values point to the data blocks, each a run
of prefix-compressed entries with restart points and checked with TF's masked CRC32C. The
values themselves are protobufs, which `_tensorflow` parses with the protobuf package.
"""

from __future__ import annotations

from collections.abc import Iterator

import crc32c

TABLE_MAGIC = 0xDB4775248B80FB57  # the last 8 bytes of every LevelDB/TF table
FOOTER_SIZE = 48  # two BlockHandles padded to 40 bytes, then the magic
TRAILER_SIZE = 5  # after each block: compression type (1 byte), masked CRC32C (4 bytes)
CRC_MASK_DELTA = 0xA282EAD8


class Garbled(ValueError):
    """Bytes that do not parse; becomes a CorruptCheckpointError naming the file."""


class Unsupported(Exception):
    """A valid index jstate cannot read; becomes a CheckpointError naming the file."""


def mask(crc: int) -> int:
    """`crc` masked, as TF stores CRCs, so that a CRC of data that holds CRCs is not degenerate.

    >>> hex(mask(0))
    '0xa282ead8'
    """
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + CRC_MASK_DELTA) & 0xFFFFFFFF


def varint(data: bytes, pos: int) -> tuple[int, int]:
    """The unsigned varint at `pos` (block handles and entry lengths) and the position after it.

    Raises:
      Garbled: it runs past the end of `data`, or past 64 bits.

    >>> varint(b"\\x00\\x96\\x01", 1)
    (150, 3)
    """
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise Garbled("a varint runs past its block")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def table(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of an SSTable held in `data`, in key order.

    The footer points to an index block whose values point to the data blocks. A block is a
    run of prefix-compressed entries (shared key length, new key bytes, value) followed by its
    restart points, which a sequential reader does not need.

    Raises:
      Garbled: for a truncated or damaged table, or an index whose data blocks overlap.
      Unsupported: for a compressed block.

    >>> from pathlib import Path
    >>> index = Path(jstate.__file__).parents[1] / "tests/data/tensorflow/guide/my_v2.ckpt.index"
    >>> [key for key, _ in table(index.read_bytes())]  # the header, then each tensor
    [b'', b'my_v2']
    """
    if len(data) < FOOTER_SIZE:
        raise Garbled(f"{len(data)} bytes is shorter than a table footer")
    footer = data[-FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != TABLE_MAGIC:
        raise Garbled("no table magic number at its end")
    _, pos = varint(footer, varint(footer, 0)[1])  # the metaindex handle: TF writes no meta blocks
    index_offset, pos = varint(footer, pos)
    index_size, _ = varint(footer, pos)
    previous_end = 0
    for _, handle in block(data, index_offset, index_size):
        offset, pos = varint(handle, 0)
        size, _ = varint(handle, pos)
        # TF writes the data blocks back to back, in key order. Holding the index to that bounds
        # the work by the file's size: an index that lists one block (or blocks overlapping it)
        # many times cannot have its bytes parsed and checksummed many times.
        if offset < previous_end:
            raise Garbled(f"the index lists blocks twice or out of order (bytes {offset}-{offset + size})")
        previous_end = offset + size + TRAILER_SIZE
        yield from block(data, offset, size)


def block(data: bytes, offset: int, size: int) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of the block of `size` bytes at `offset` of `data` (a table), after
    checking its checksum and compression.

    Raises:
      Garbled, Unsupported: as `table`.

    >>> list(block(b"\\x00" * 60, 0, 4))  # an empty block: no restart points, then a bad checksum
    Traceback (most recent call last):
    ...
    jstate.formats.tf_table.Garbled: the block at bytes 0-4 fails its checksum
    """
    end = offset + size
    if end + TRAILER_SIZE > len(data) - FOOTER_SIZE or size < 4:
        raise Garbled(f"a block at bytes {offset}-{end} runs past the table")
    kind = data[end]
    stored = int.from_bytes(data[end + 1 : end + TRAILER_SIZE], "little")
    if mask(crc32c.crc32c(memoryview(data)[offset : end + 1])) != stored:
        raise Garbled(f"the block at bytes {offset}-{end} fails its checksum")
    if kind != 0:
        raise Unsupported(
            f"its block at bytes {offset}-{end} is compressed ({'snappy' if kind == 1 else f'type {kind}'}); "
            "TensorFlow writes checkpoint indexes uncompressed, and jstate reads only those."
        )
    num_restarts = int.from_bytes(data[end - 4 : end], "little")
    limit = end - 4 * (num_restarts + 1)
    if limit < offset:
        raise Garbled(f"the block at bytes {offset}-{end} has {num_restarts} restart points")
    pos, key = offset, b""
    while pos < limit:
        shared, pos = varint(data, pos)
        unshared, pos = varint(data, pos)
        length, pos = varint(data, pos)
        if shared > len(key) or pos + unshared + length > limit:
            raise Garbled(f"an entry at byte {pos} of the block at bytes {offset}-{end} runs past it")
        key = key[:shared] + data[pos : pos + unshared]
        pos += unshared
        yield key, data[pos : pos + length]
        pos += length
