"""Where a TensorFlow checkpoint's files are: the files of a prefix, and the ``checkpoint``
state file that names the latest prefix in a directory.

A TensorFlow checkpoint (TF1 ``Saver``, TF2 ``tf.train.Checkpoint``) is a prefix such as
``train/model.ckpt-20`` and the files named after it; TensorFlow keeps a text
``CheckpointState`` beside them:

  train/model.ckpt-20.index                   the index: which tensors, where (`tensorflow`)
  train/model.ckpt-20.data-00000-of-00002     the tensors' bytes, in one or more shards
  train/checkpoint                            ``model_checkpoint_path: "model.ckpt-20"``

Reading what a prefix holds is `tensorflow`'s; this module only names files and finds prefixes.
"""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import text_format

from ..storage import store as _storage
from .tf_proto import CheckpointState

STATE_FILE = "checkpoint"
# The most of a state file that is read: TensorFlow's names a few paths (all it keeps, with
# their times); a larger one is no state file.
STATE_LIMIT = 1 << 20
_DATA_FILE = re.compile(r"(.+)\.data-\d{5}-of-\d{5}")


def find(path: Path) -> Path | None:
    """The prefix of the TensorFlow checkpoint that `path` names, or None if it names none.

    Valid forms of `path`:

      ckpt/model.ckpt-1000                         the prefix (``model.ckpt-1000.index`` exists)
      ckpt/model.ckpt-1000.index                   its index file
      ckpt/model.ckpt-1000.data-00000-of-00001     one of its data files

    A directory is not a checkpoint here: `latest` finds the one its state file names.

    Returns:
      The prefix (`path` without the file's suffix), or None: no ``.index`` file is there.

    >>> Path("old").mkdir(); Path("old/model.ckpt-20.index").touch()
    >>> find(Path("old/model.ckpt-20.index")), find(Path("old/model.ckpt-30"))
    (PosixPath('old/model.ckpt-20'), None)
    """
    path = Path(path)
    if not path.name:  # "." or "/": a directory, never a prefix
        return None
    if path.name.endswith(".index") and path.is_file():
        return path.with_name(path.name[: -len(".index")])
    m = _DATA_FILE.fullmatch(path.name)
    if m and index_file(path.with_name(m.group(1))).is_file():
        return path.with_name(m.group(1))
    return path if index_file(path).is_file() else None


def latest(directory: Path) -> Path | None:
    """The prefix that TensorFlow's ``checkpoint`` state file in `directory` names as the latest.

    A relative ``model_checkpoint_path`` is taken relative to `directory` (as TF does). A name
    that leads outside `directory` (symlinks resolved) is never followed: an absolute path
    elsewhere, as after the directory was moved or copied from another machine, or ``../``. Its
    last component is looked for inside `directory` instead, so a moved directory still works
    and a state file cannot point at checkpoints elsewhere.

    Returns:
      The prefix, as `directory` joined with the name (or its last component); None if there is
      no state file, it does not parse, it names nothing, or the named checkpoint's ``.index``
      is missing.

    Raises:
      CheckpointError: the state file is no regular file (a FIFO, a link to a device), is over
        `STATE_LIMIT` bytes, or cannot be read: it is refused unread, naming it.

    >>> Path("train").mkdir(); Path("train/model.ckpt-20.index").touch()
    >>> _ = Path("train/checkpoint").write_text('model_checkpoint_path: "model.ckpt-20"')
    >>> latest(Path("train"))
    PosixPath('train/model.ckpt-20')
    """
    directory = Path(directory)
    try:
        text = _storage.read_bytes(directory / STATE_FILE, STATE_LIMIT, "TensorFlow state file").decode("utf-8")
        # Unknown fields skipped: a newer TensorFlow may add some, and only the path matters here.
        name = text_format.Parse(text, CheckpointState(), allow_unknown_field=True).model_checkpoint_path
    except (OSError, UnicodeDecodeError, text_format.ParseError):
        return None
    if not name:
        return None
    try:
        root = directory.resolve()
        for prefix in (directory / name, directory / Path(name).name):
            # Strictly below: a name that resolves to `directory` itself would put its .index beside it.
            if root in prefix.resolve().parents and index_file(prefix).is_file():
                return prefix
    except (OSError, ValueError, RuntimeError):  # a NUL byte in the name, a symlink loop
        return None
    return None


def index_file(prefix: Path) -> Path:
    """The index file of the checkpoint `prefix`.

    >>> index_file(Path("train/model.ckpt-20"))
    PosixPath('train/model.ckpt-20.index')
    """
    return prefix.with_name(prefix.name + ".index")


def data_file(prefix: Path, shard: int, num_shards: int) -> Path:
    """Data file `shard` (counted from 0) of the `num_shards` of the checkpoint `prefix`.

    >>> data_file(Path("train/model.ckpt-20"), 0, 2)
    PosixPath('train/model.ckpt-20.data-00000-of-00002')
    """
    return prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}")
