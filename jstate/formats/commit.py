"""The commit rule: a jstate checkpoint exists exactly when its manifest does.

A checkpoint at ``ckpt/model-1000`` is a directory:

  jstate.json             the manifest (`manifest`), written last in one atomic step
  arrays-<token>/         the arrays of one save (an Orbax checkpoint), under the save's token
  default/                instead, in the Orbax layout (`Saver(layout="orbax")`): the name an Orbax
                          CheckpointManager reads; such a checkpoint is written once, never re-saved

A save writes its arrays under a token no other save uses, then the manifest naming them: a
reader sees the old checkpoint or the new one, never a mix, and a save killed at any moment
leaves at most files that no manifest names. Re-saving a path replaces its manifest in one
step, after which the replaced arrays are removed. Deleting a checkpoint removes its manifest
first. Object stores (gs://, s3://) keep this same rule: writing one object is atomic there,
renaming a directory is not, and nothing here renames a checkpoint or its arrays (on a local
disk only a new, still empty checkpoint directory is renamed into place, holding its save's
marker). All I/O is `storage`'s: where the rule depends on the store, it asks what the store can
do (`Store.renames`, `Store.shared`), never which kind it is.

Leftovers (arrays no manifest names, temporary files, directories left empty) are removed by
`clean` only once their writer is gone (`tokens.alive`), and an arrays directory only after
its writer is known to be done *and* the manifest, read after that, does not name it: a
finished save's arrays can stop being named, never start, so that order is race-free. (One
exception: a deletion that took a manifest re-saved since it was chosen puts it back; while a
deletion is in flight, a missing manifest is not taken as final.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

from ..core.errors import CheckpointError, StoreError
from ..storage import store as _storage
from ..storage import tokens as _tokens
from .manifest import ARRAYS, FILE, Manifest

_DATA = ARRAYS + "-"
ORBAX_ARRAYS = "default"  # the arrays of a checkpoint in the Orbax layout: a CheckpointManager's one item
_ORBAX_TMP = ".orbax-checkpoint-tmp"  # Orbax writes into "<arrays-token>.orbax-checkpoint-tmp", then renames
_DELETING = f".{FILE}.deleting."  # a manifest taken by `delete`: ``.jstate.json.deleting.<token>.tmp``
# The longest name a save adds inside a checkpoint directory: a data directory during
# Orbax's write, or the manifest's temporary file.
_LONGEST = len(_DATA) + 80 + len(_ORBAX_TMP) + 20


def data_dir(final: Path, token: str) -> Path:
    """Where a save with `token` writes the arrays of checkpoint `final`.

    >>> data_dir(Path("ckpt/model-1"), "host-1-abc")
    PosixPath('ckpt/model-1/arrays-host-1-abc')
    """
    return final / f"{_DATA}{token}"


def _token_of(name: str) -> str | None:
    """The writer token in the name of a file a save puts in a checkpoint directory: its arrays
    (with whatever suffix Orbax adds while it writes), a temporary file, a marker."""
    return _tokens.token_in(name, _DATA)


def prepare(final: Path, token: str) -> None:
    """Before a save to `final`: refuse to overwrite what is not a jstate checkpoint, check name
    lengths, create `final` durably, marked as written by `token` (so that a save killed before
    it wrote anything leaves a directory `clean` recognizes), and remove what dead writers left
    in its directory.

    Raises:
      CheckpointError: `final` exists and is not a jstate checkpoint (committed or not).
      OSError: a name is too long, or the file system refuses.
    """
    if _storage.exists(final) and (not is_ours(final) or _storage.is_mount(final)):
        raise CheckpointError(
            f"Cannot save to {final}: it exists and is not a jstate checkpoint ({_in_the_way(final)}), and saving "
            f"would replace it. Nothing was written or deleted. {_instead(final)}"
        )
    _storage.check_name_lengths(final)
    _storage.check_name_lengths(final / "x", _LONGEST)
    _storage.create_marked(final, _marker(final, token).name)
    # Before writing, not after: a killed save's leftovers may be what fills the disk.
    clean(final.parent)


def _in_the_way(final: Path) -> str:
    """What makes `final` no jstate checkpoint, for an error."""
    if _storage.is_symlink(final):
        return "it is a symbolic link: what it points to is not this directory's"
    if _storage.is_mount(final):
        return "it is a mount point: what is mounted there is not this directory's"
    if not _storage.is_dir(final):
        return "it is a file"
    names = sorted(_not_ours(_storage.listdir(final)))
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    without = f" without a jstate manifest ({FILE}) beside them" if ARRAYS in names or ORBAX_ARRAYS in names else ""
    return f"it holds {shown}{without}"


def _instead(final: Path) -> str:
    if _storage.is_dir(final) and not _storage.is_symlink(final):
        return f"Save under a prefix inside it instead, e.g. `saver.save(state, '{final}/model', step=...)`."
    return "Choose another path."


def _marker(final: Path, token: str) -> Path:
    return final / f".saving.{token}.tmp"


def is_ours(path: Path) -> bool:
    """Whether `path` is a directory holding only what jstate saves put there.

    >>> is_ours(Path(jstate.Saver().save(state, "ckpt/model"))), is_ours(Path("ckpt"))
    (True, False)
    """
    if not _storage.is_dir(path) or _storage.is_symlink(path):
        return False
    return only_ours(_storage.listdir(path))


def only_ours(names: Iterable[str]) -> bool:
    """Whether the names in a directory are all ones that jstate saves put there.

    >>> only_ours(["jstate.json", "arrays"]), only_ours(["jstate.json", "notes.txt"])
    (True, False)
    >>> only_ours(["arrays"])  # jstate 0.1's layout only beside its manifest: else a user's
    False
    >>> only_ours(["jstate.json", "default"]), only_ours(["default"])  # the Orbax layout's, or Orbax's own
    (True, False)
    """
    return not _not_ours(names)


def _not_ours(names: Iterable[str]) -> list[str]:
    """The names in a directory that no jstate save put there: what is in the way of a save."""
    names = list(names)
    # Names without a token are ours only beside what only jstate writes. Alone, `arrays/` (the
    # layout of jstate 0.1) is a user's directory or a plain Orbax checkpoint, and `default/` is
    # what an Orbax CheckpointManager writes: never jstate's to replace or remove. The old
    # layout's arrays count only beside its manifest (or one a deletion took), which 0.1 wrote;
    # the Orbax layout's also beside a save's marker, which comes first.
    manifest = any(n == FILE or n.startswith(_DELETING) for n in names)
    fixed = manifest or any(_token_of(n) is not None for n in names)
    return [
        n
        for n in names
        if not (n == FILE or _token_of(n) is not None or (manifest and n == ARRAYS) or (fixed and _is_fixed(n)))
    ]


def _is_fixed(name: str) -> bool:
    """Whether `name` is the Orbax layout's arrays, written or (Orbax's temporary name) being written."""
    return name == ORBAX_ARRAYS or name.startswith(ORBAX_ARRAYS + _ORBAX_TMP)


def commit(final: Path, manifest: Manifest, token: str) -> None:
    """Publish `manifest` (naming this save's arrays) as checkpoint `final`: one atomic write.
    The arrays it replaces, if any, are removed once it is published."""
    manifest.write(final)
    _storage.unlink(_marker(final, token))
    # `final` may not be the directory `prepare` flushed: while it was empty, a failed save to
    # the same path or a `clean` beside us may have removed it, and Orbax made it again.
    _storage.sync_dir(final.parent)
    clean_checkpoint(final)


def delete(path: Path, expected: Manifest | None = None) -> bool:
    """Delete checkpoint `path`: its manifest first (it stops being listed), then its files.

    With `expected`, only if its manifest is still that one: a checkpoint re-saved since it was
    chosen for deletion is kept.

    A `path` that is a symbolic link (to a checkpoint of another run, linked to resume from
    it) is never followed: the link alone is removed, and what it points to is left intact. A
    `path` that is a mount point (another run's checkpoint bind-mounted there) cannot be removed
    without unmounting it: it is left as it is, mounted and listed, and so is what it holds.

    Returns:
      Whether it was deleted (False: it was re-saved since, is gone already, or is a mount point).

    >>> path = Path(jstate.Saver().save(state, "ckpt/model"))
    >>> delete(path, expected=Manifest({})), delete(path), path.exists()
    (False, True, False)
    """
    if _storage.is_symlink(path):  # its manifest and arrays are another directory's
        _storage.unlink(path)
        return True
    if _storage.is_mount(path):  # as a link's, and there is no link to remove
        return False
    arrays = _arrays_of(path, expected)
    if not _storage.store_for(path).renames:
        deleted = _unlist(path, expected)
    elif expected is not None and Manifest.read(path) != expected:
        return False  # re-saved since it was chosen: kept, without ever being unlisted
    else:
        deleted = _take(path, expected)
    if deleted:
        # The arrays the manifest just taken named (`expected`'s, the Orbax layout's or jstate 0.1's
        # `arrays/`, which no token says whose they are): a finished save's, even while its writer
        # still runs (their token would keep them from cleaning then, and nothing cleans them once
        # it exits). Left there, 0.1's `arrays/` would make the directory a user's (`only_ours`).
        named = arrays is not None and (arrays in (ORBAX_ARRAYS, ARRAYS) or expected is not None)
        if named and _storage.store_for(path).renames:  # (`_unlist` removed them)
            _storage.remove(path / arrays)
        clean_checkpoint(path)
        if named:  # what else it held was cleaned (an empty step directory would still be a step to Orbax)
            _storage.remove_empty_dir(path)
    return deleted


def _arrays_of(path: Path, expected: Manifest | None) -> str | None:
    """The arrays directory that the manifest of `path` (or `expected`) names, None if unknown."""
    if expected is not None:
        return expected.arrays
    with contextlib.suppress(CheckpointError):
        found = Manifest.read(path)
        return None if found is None else found.arrays
    return None


def _take(path: Path, expected: Manifest | None) -> bool:
    """Unlist `path` by renaming its manifest away, which takes exactly one version of it; put
    it back if that version is not `expected`."""
    manifest_path = path / FILE
    name = _tokens.token()
    # The token names the taken manifest (so a killed deletion's file is removed once it is
    # dead) and is live while the manifest may be put back: `clean_checkpoint` waits for it.
    taken = path / f"{_DELETING}{name}.tmp"
    with _tokens.writing(name):
        try:
            _storage.rename(manifest_path, taken)
        except FileNotFoundError:
            return False
        if expected is not None and Manifest.read_file(taken, path) != expected:
            # Re-saved in between: put it back, unless a newer one has arrived meanwhile.
            with contextlib.suppress(FileExistsError):
                _storage.link(taken, manifest_path)
            _storage.unlink(taken)
            _storage.sync_dir(path)
            return False
        _storage.sync_dir(path)
        _storage.unlink(taken)
    return True


def _unlist(path: Path, expected: Manifest | None) -> bool:
    """Unlist `path` where no rename takes exactly one version of an object: the manifest is
    deleted only while it is still the version compared (a precondition the store checks: GCS's
    generation, S3's ETag), so a re-save of this very path landing in between is kept. (On a
    store that ignores preconditions, such a re-save is lost: docs/guides/object_storage.md.)
    The arrays it named are a finished save's, so they go at once; other writers' leftovers
    wait for `clean` and their age."""
    manifest = path / FILE
    # The version first, then the bytes: bytes equal to `expected` were read from this version,
    # since any write changes the version and every manifest's bytes differ (its arrays' token).
    version = _storage.version(manifest)
    if version is None:
        return False
    current = Manifest.read(path)
    if current is None or (expected is not None and current != expected):
        return False  # re-saved since it was chosen: kept
    if not _storage.unlink_if(manifest, version):
        return False  # re-saved (or deleted) since it was compared: kept
    _storage.remove(path / current.arrays)
    return True


def clean_checkpoint(path: Path, names: Iterable[str] | None = None) -> None:
    """Remove what finished or dead saves left in checkpoint directory `path`: arrays its
    manifest does not name, temporary files; and `path` itself if that leaves it empty.
    `names` are those in `path`, where the caller has listed them. A `path` that is a symbolic
    link or a mount point is left alone: what it holds lies outside the directory being cleaned."""
    if _storage.is_symlink(path):
        return
    entries = _storage.iterdir(path) if names is None else [path / n for n in names]
    shared = _storage.store_for(path).shared
    tokens = {e: t for e in entries if (t := _token_of(e.name)) is not None}
    done = [e for e, t in tokens.items() if not _tokens.alive(t, shared=shared)]
    legacy = any(e.name == ARRAYS for e in entries)  # written by jstate before tokens
    # The Orbax layout's arrays (no token in their name): ours only beside a marker or a manifest
    # (`only_ours`); a failed save into an Orbax step must leave the step's own `default/` alone.
    ours = bool(tokens) or any(e.name == FILE for e in entries)
    fixed = [e for e in entries if _is_fixed(e.name)] if ours else []
    if not done and not legacy and not fixed:
        return
    if _storage.is_mount(path):  # (asked only here, where something would go: it reads the mount table)
        return
    try:  # read after the liveness checks: see the module docstring
        named = Manifest.read(path)
    except CheckpointError:
        return  # a damaged manifest: leave everything for the user to look at
    if named is None and _may_come_back(path):
        return
    if legacy and named is not None and named.arrays != ARRAYS:  # re-saved since: replaced
        done.append(path / ARRAYS)
    if named is None and len(done) == len(tokens):  # deleted, or its one save is dead: nothing will name them
        done += fixed
    for entry in done:
        if named is None or entry.name != named.arrays:
            _storage.remove(entry)
    if named is None:
        _storage.remove_empty_dir(path)


def _may_come_back(path: Path) -> bool:
    """Whether the manifest of `path`, found missing, may be back: a deletion in flight took it
    and may put it back (a re-save it must keep, see `delete`), or has already. Listed before
    the manifest is looked for again, so one of the two is seen."""
    try:
        names = _storage.listdir(path)
    except OSError:
        return True  # not knowing, nothing is removed
    shared = _storage.store_for(path).shared
    if any(n.startswith(_DELETING) and _tokens.alive(_token_of(n) or "", shared=shared) for n in names):
        return True
    return _storage.exists(path / FILE)


def clean(directory: Path, prefix: str | None = None) -> None:
    """`clean_checkpoint` every jstate checkpoint directory in `directory` (named
    ``<prefix>...`` if given): leftovers of killed and failed saves and deletions.

    Where each request is a round trip (an object store), one listing of everything under
    `directory` tells which children are jstate's and what is in them: a save beside N
    checkpoints makes no request per checkpoint unless it has leftovers to remove."""
    store = _storage.store_for(directory)
    if store.round_trips:
        listed = _storage.by_child(store.files(directory, prefix or ""))
        children = {directory / name: {below.split("/", 1)[0] for below in objects} for name, objects in listed.items()}
    else:
        children = {c: None for c in _storage.iterdir(directory) if prefix is None or c.name.startswith(prefix)}
    for child, names in children.items():
        try:
            token = _tokens.token_in(child.name)
            if token is not None and not _tokens.alive(token, shared=store.shared):
                _storage.remove(child)  # a dead save's temporary file, or its directory being made
            elif names is None:
                # A settled checkpoint has nothing to clean, and its manifest (up to 1 GiB, parsed
                # into many times that) need not be read: a save beside N checkpoints reads none.
                if is_ours(child) and not _settled(set(_storage.listdir(child))):
                    clean_checkpoint(child)
            elif "" not in names and only_ours(names) and not _settled(names):
                clean_checkpoint(child, names)
        except StoreError:
            raise  # a store that does not answer fails the save that needs it
        except (CheckpointError, OSError):
            # One entry this process cannot read or clean (no permission, a loop of links) keeps
            # its leftovers for a later clean, and never stops a save beside it.
            continue


def _settled(names: set[str]) -> bool:
    """Whether a checkpoint directory holds its manifest and one arrays directory, nothing else:
    then the manifest names those arrays (it never names arrays that were not written, but for
    a checkpoint of zero-size arrays only, whose own commit removed what it replaced), nothing
    is to be removed, and its manifest need not be read to know it."""
    return len(names) == 2 and FILE in names and any(n.startswith(_DATA) or n == ORBAX_ARRAYS for n in names)
