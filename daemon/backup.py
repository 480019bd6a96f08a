"""Backups of a node's store, and their restore (docs/backup.md).

A backup is a folder with two things in it:

    <backup>/store/          a checkpoint of <data_dir>/store (Store.checkpoint): RocksDB's, and the
                             segment files in store/segments
    <backup>/manifest.json   what it is: format, FlexCache version, time, entry count, node

`backup` takes one while the daemon serves (NodeService.Backup): the checkpoint is consistent (every
entry in it whole, as of one moment) and cheap on the store's own file system (hard links). The
manifest is written last, so a folder with a manifest is a complete backup; a backup that fails half
way removes its folder. `restore` copies the checkpoint into a stopped daemon's data folder. The index
is in neither: a daemon that starts on a restored store reconciles each namespace's index with it at
first use and re-indexes every entry from the vectors the store keeps (cache.py, `_reconcile`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexcache.v1 import node_pb2

from .errors import InvalidRequest, TooLarge, Unavailable, WrongPath
from .segments import fsync_path
from .version import version

if TYPE_CHECKING:
    from .store import Store

# manifest.json's "format": 2 since blobs are in segment files (<backup>/store/segments), which a release
# restoring only format 1 would not know; format 1 backups (blobs in RocksDB) restore too, and the daemon
# moves their blobs into segments when it first opens the store.
FORMAT = 2
RESTORES = (1, 2)
MANIFEST = "manifest.json"
STORE = "store"  # the checkpoint's folder in a backup, and the store's in a data folder


def backup(store: Store, path: str, entries: int, *, node: str = "") -> node_pb2.BackupResponse:
    """Write a consistent copy of `store` to the folder `path` while puts go on, with its manifest.

    `path`: absolute, not existing yet, in a folder that exists and that the daemon may write.
    `entries`: the node's entry count as the caller knows it, for the manifest (puts that land during
    the checkpoint may make the copy hold a few more). `node`: what names the node in the manifest
    (by default the host name: a pod's name in Kubernetes). InvalidRequest for an unusable path;
    TooLarge if the disk fills; Unavailable if RocksDB or the file system fails. Nothing of a backup
    that failed is left behind."""
    from .store import DiskFull, folder_bytes

    root = _backup_path(store, path)
    try:
        root.mkdir()  # the last check of "does not exist": two backups to one path cannot both get it
    except FileExistsError:
        raise InvalidRequest(f"backup path {path} already exists; name a folder that does not exist yet") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot create the backup folder {path}: {exc.strerror or exc}") from exc
    try:
        store.checkpoint(root / STORE)
        _write_manifest(root, {"format": FORMAT, "flexcache_version": version(),
                               "created": datetime.now(UTC).isoformat(timespec="seconds"),
                               "created_unix": round(time.time(), 3), "entries": int(entries),
                               "node": node or socket.gethostname(), "source": str(store.path)})
    except BaseException as exc:
        shutil.rmtree(root, ignore_errors=True)
        if isinstance(exc, DiskFull):
            raise TooLarge(f"the backup to {path} failed: {exc}") from exc
        if isinstance(exc, Exception):  # RocksDB (a plain Exception) or the file system
            raise Unavailable(f"the backup to {path} failed: {exc}") from exc
        raise
    return node_pb2.BackupResponse(path=str(root), entries=int(entries), bytes=folder_bytes(root))


def within(backup_dir: str, path: str) -> str:
    """The absolute path a Backup request's `path` names: relative paths are inside `backup_dir`, and
    absolute ones must be. Without a backup_dir a daemon takes no backups (WrongPath): a caller that
    may call Backup could otherwise make it write wherever the daemon may."""
    if not backup_dir:
        raise WrongPath("this daemon takes no backups: start it with backup_dir, the folder they may go in")
    if "\0" in path:
        raise InvalidRequest("the backup path holds a NUL character")
    root = Path(backup_dir).resolve()
    target = Path(os.path.normpath(root / path))  # an absolute `path` replaces `root`
    if target == root or root not in target.parents:
        raise InvalidRequest(f"backup path {path!r} is not inside backup_dir {backup_dir}; name a folder in it")
    return str(target)


def _backup_path(store: Store, path: str) -> Path:
    """`path` checked: one clear sentence (InvalidRequest) for each way it is unusable."""
    if not path:
        raise InvalidRequest("name the backup folder: an absolute path that does not exist yet")
    if "\0" in path:
        raise InvalidRequest("the backup path holds a NUL character")
    if not os.path.isabs(path):
        raise InvalidRequest(f"backup path {path!r} is relative; name an absolute path on the node")
    root = Path(os.path.normpath(path))
    if os.path.lexists(root):
        raise InvalidRequest(f"backup path {path} already exists; name a folder that does not exist yet")
    parent = root.parent
    if not parent.is_dir():
        raise InvalidRequest(f"the folder {parent} that would hold backup {path} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidRequest(f"the daemon may not write in {parent}, the folder that would hold backup {path}")
    live = store.path.resolve()
    target = parent.resolve() / root.name
    if target == live or live in target.parents:
        raise InvalidRequest(f"backup path {path} is inside the store's own folder {store.path}; name a folder "
                             "outside it")
    return root


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Written last, whole (a rename) and synced with its folder: its presence says the backup is complete."""
    partial = root / (MANIFEST + ".partial")
    with partial.open("w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    partial.replace(root / MANIFEST)
    fsync_path(root)


def read_manifest(backup: Path) -> dict[str, Any]:
    """The backup's manifest, checked: InvalidRequest if `backup` is not a complete backup this release
    can restore."""
    manifest_file = backup / MANIFEST
    if not backup.is_dir():
        raise InvalidRequest(f"{backup} is not a folder; name a backup folder (the path given to `flexcache backup`)")
    if not manifest_file.is_file():
        raise InvalidRequest(f"{backup} is not a complete backup: it has no {MANIFEST} (a backup that failed, "
                             "or not a backup folder)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, UnicodeError, ValueError) as exc:
        raise InvalidRequest(f"the manifest {manifest_file} cannot be read: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), int):
        raise InvalidRequest(f"the manifest {manifest_file} is not a FlexCache backup manifest")
    if manifest["format"] not in RESTORES:
        raise InvalidRequest(f"backup {backup} has format {manifest['format']}; this release restores formats "
                             f"{', '.join(map(str, RESTORES))} (restore it with the release that wrote it, "
                             f"{manifest.get('flexcache_version', 'unknown')})")
    if not isinstance(manifest.get("entries"), int) or manifest["entries"] < 0:
        raise InvalidRequest(f"the manifest {manifest_file} has no entry count")
    if not (backup / STORE / "CURRENT").is_file():
        raise InvalidRequest(f"backup {backup} has no checkpoint: {backup / STORE} is not a RocksDB folder")
    return manifest


def restore(backup: Path, data_dir: Path, force: bool = False) -> int:
    """Copy the backup's checkpoint into `data_dir` as its store, for a stopped daemon to start on; the
    number of entries the manifest counts. The backup is only read (a copy, never a move: it stays
    usable). Nothing of the index is written: the daemon rebuilds it from the store.

    InvalidRequest if `backup` is not a backup, or `data_dir` already holds a store (unless `force`:
    then that store is replaced, once the copy is whole, and never while a daemon has it open).
    OSError if the copy fails; the data folder is then as it was."""
    backup, data_dir = Path(backup), Path(data_dir)
    manifest = read_manifest(backup)
    store_dir = data_dir / STORE
    held = _holds_store(store_dir)
    if held and not force:
        raise InvalidRequest(f"{data_dir} already holds a store ({store_dir}); restore into an empty data folder, "
                             "or pass --force to replace it (its entries are lost)")
    if held:
        _check_not_in_use(store_dir, data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    incoming = data_dir / f".{STORE}.restoring"
    outgoing = data_dir / f".{STORE}.replaced"
    for leftover in (incoming, outgoing):  # an earlier restore that was interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        shutil.copytree(backup / STORE, incoming, copy_function=_copy_synced)
        fsync_path(incoming)
        if os.path.lexists(store_dir):
            store_dir.rename(outgoing)
        incoming.rename(store_dir)
        fsync_path(data_dir)
    except BaseException:
        if os.path.lexists(outgoing) and not os.path.lexists(store_dir):
            outgoing.rename(store_dir)  # the store that was there, back in its place
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    shutil.rmtree(outgoing, ignore_errors=True)
    return int(manifest["entries"])


def _copy_synced(src: str, dst: str) -> str:
    shutil.copy2(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dst


def _holds_store(store_dir: Path) -> bool:
    """Whether `store_dir` holds anything (an empty or missing folder is no store)."""
    if not os.path.lexists(store_dir):
        return False
    if not store_dir.is_dir():
        return True
    return any(store_dir.iterdir())


def _check_not_in_use(store_dir: Path, data_dir: Path) -> None:
    """InvalidRequest if a daemon has the store open (RocksDB's lock), as `flexcache verify` finds it.
    A store too damaged to open is not in use: replacing it is what --force is for."""
    from .store import Store, StoreLocked

    if not (store_dir / "CURRENT").is_file():
        return
    try:
        Store(store_dir, max_bytes=0, audit=True).close()
    except StoreLocked:
        raise InvalidRequest(f"the data folder {data_dir} is in use by a running daemon; stop it before "
                             "restoring into it") from None
    except Exception:  # damage: replacing the store is what --force is for
        return
