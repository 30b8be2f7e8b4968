"""Index versions over time: the writer lock, reader leases, garbage collection and the history.

On disk, beside the version folders (docs/index.md, "Freshness")::

    <root>/LOCK                         held by the one process writing a version (build, add, delete, compact, gc)
    <root>/leases/<version>--<host>--<pid>--<token>.json     a reader of <version>: expires unless renewed
    <root>/v-00003/COLLECTED            gc removed this version; files newer versions share are still here
    <root>/v-00003/PUBLISHED            LATEST named this version (a manifest without it was abandoned)

**One writer at a time.** Every operation that writes a version takes ``LOCK`` first. On a local or shared
POSIX filesystem it is created with ``os.open(O_CREAT | O_EXCL)``, which exactly one process wins. On object
stores pyarrow has no exclusive create: the lock is written only when absent and read back to check the token,
which narrows the race but does not close it (two writers that check within the same moment can both win).
The lock holds the writer's host, pid, command and start time; a second writer is refused with them, and told
when that pid is no longer running on this host. The lock is removed when the writer finishes or fails;
a writer that is killed leaves it behind (the message says to remove it).

**Readers hold leases.** A long-lived reader (the serving ShardSearcher and Retriever, anything that passes
``lease=`` to ``ShardedIndex.open`` or ``open_docstore``) writes a lease file naming its version, host and pid
with an expiry ``LEASE_TTL_S`` ahead, and a background thread renews it every third of that while the reader
object is alive; when the object is garbage-collected (the replica dropped that version) the lease file is
removed. ``gc`` never deletes a version with an unexpired lease, nor one superseded less than
``grace_s`` ago (for short-lived readers that take no lease: ``ragtune search``, ``eval-retrieval``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

from configs.errors import RagtuneError, redact
from sharding.layout import MANIFEST, PUBLISHED, root_relative, version_name
from sharding.manifest import list_versions, manifest_files, read_index_manifest, read_latest
from sharding.storage import (
    Location,
    atomic_write_bytes,
    create_exclusive,
    delete_dir_if_empty,
    delete_file,
    exists,
    list_dir,
    list_files,
    read_bytes,
)

log = logging.getLogger("ragtune.index")

LOCK = "LOCK"
LEASES = "leases"
COLLECTED = "COLLECTED"
LEASE_TTL_S = 300.0  # a reader that stops renewing (killed) no longer protects its version after this long
GRACE_S = 600.0  # gc keeps versions superseded less than this ago (readers without a lease)


def root_of(version_dir: Location) -> Location:
    """The index root a version folder lives in (its parent)."""
    return version_dir.parent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


# --- the writer lock --------------------------------------------------------------------------------------------

@dataclass
class WriterLock:
    """``with WriterLock(root, "add"):`` the one process that may write a version of the index at ``root``."""

    root: Location
    command: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def loc(self) -> Location:
        return self.root.join(LOCK)

    def __enter__(self) -> WriterLock:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "command": redact(self.command), "since": time.time(),
                "token": self.token}
        if create_exclusive(self.loc, json.dumps(info).encode()):
            if self.loc.is_local or self._holder().get("token") == self.token:
                return self
        raise RagtuneError(self._busy_message())

    def __exit__(self, *exc: Any) -> None:
        if self._holder().get("token") == self.token:
            delete_file(self.loc)

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(read_bytes(self.loc))
        except (OSError, ValueError):
            return {}

    def _busy_message(self) -> str:
        h = self._holder()
        if not h:
            return (f"{self.loc.uri}: another writer holds the index lock (its lock file is unreadable). Fix: wait "
                    f"for it, or remove {self.loc.uri} if no `ragtune index` is writing this index")
        since = h.get("since", 0.0)
        who = (f"{h.get('command', '?')!r} (pid {h.get('pid')} on {h.get('host')}, since "
               f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}, {time.time() - since:,.0f}s ago)")
        msg = f"{self.root.uri}: another writer holds the index lock: {who}. Fix: wait for it to finish and retry"
        if h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int) and not _pid_alive(h["pid"]):
            return (f"{self.root.uri}: the index lock is held by {who}, but that process is no longer running on "
                    f"this host (it died while writing). Fix: remove {self.loc.uri} and retry; the version it was "
                    "writing never became LATEST")
        return f"{msg}, or remove {self.loc.uri} if that process is dead"


# --- reader leases ----------------------------------------------------------------------------------------------

class Lease:
    """A reader's claim on one version: a file under ``<root>/leases/``, renewed until released."""

    def __init__(self, version_dir: Location, owner: str, ttl_s: float = LEASE_TTL_S):
        self.version = version_dir.path.rstrip("/").rsplit("/", 1)[-1]
        self.root = root_of(version_dir)
        self.owner, self.ttl_s = owner, ttl_s
        host = socket.gethostname()
        self.loc = self.root.join(LEASES, f"{self.version}--{host}--{os.getpid()}--{uuid.uuid4().hex[:8]}.json")
        self.released = False
        self.renew()

    def renew(self) -> None:
        if self.released:
            return
        now = time.time()
        atomic_write_bytes(self.loc, json.dumps({
            "version": self.version, "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "renewed_at": now, "expires_at": now + self.ttl_s}).encode())

    def release(self) -> None:
        self.released = True
        _ACTIVE.discard(self)
        try:
            delete_file(self.loc)
        except OSError as e:  # the store is unreachable: the lease expires by itself
            log.warning("could not remove lease %s: %s", self.loc.shown, e)


_ACTIVE: set[Lease] = set()
_RENEWER: threading.Thread | None = None
_RENEWER_LOCK = threading.Lock()


def _renew_forever() -> None:
    while True:
        time.sleep(max(1.0, min([lease.ttl_s / 3 for lease in list(_ACTIVE)] or [LEASE_TTL_S / 3])))
        for lease in list(_ACTIVE):
            try:
                lease.renew()
            except OSError as e:  # a storage hiccup: the next round tries again, well before expiry
                log.warning("could not renew lease %s: %s", lease.loc.shown, e)


def hold_lease(version_dir: Location, owner: str, holder: Any = None, ttl_s: float = LEASE_TTL_S) -> Lease:
    """Lease ``version_dir`` for a reader; renewed in the background until released, or until ``holder`` (the
    object that reads the version) is garbage-collected (``weakref.finalize``). ``owner`` names the reader in
    the lease file (e.g. "ShardSearcher")."""
    global _RENEWER
    lease = Lease(version_dir, owner, ttl_s)
    _ACTIVE.add(lease)
    if holder is not None:
        weakref.finalize(holder, lease.release)
    with _RENEWER_LOCK:
        if _RENEWER is None:
            _RENEWER = threading.Thread(target=_renew_forever, name="ragtune-leases", daemon=True)
            _RENEWER.start()
    return lease


def read_leases(root: Location) -> list[dict[str, Any]]:
    """Every lease file under the root, parsed (unreadable ones are skipped), with its ``file`` name."""
    out = []
    for f in list_dir(root.join(LEASES)):
        if not f.base_name.endswith(".json"):
            continue
        try:
            out.append({**json.loads(read_bytes(root.join(LEASES, f.base_name))), "file": f.base_name})
        except (OSError, ValueError):
            continue
    return out


# --- what each version folder is --------------------------------------------------------------------------

def version_states(root: Location) -> dict[str, str]:
    """Every version folder under the root: ``complete`` (a manifest, and LATEST names it or once did),
    ``abandoned`` (a manifest LATEST never named: its writer died between writing the manifest and switching
    LATEST), ``unfinished`` (no manifest: its writer died earlier) or ``collected`` (gc removed it; files newer
    versions share are still there).

    LATEST once named a version when its folder holds ``PUBLISHED`` (``switch_latest`` writes it; writers also
    write it for the version LATEST names when they start, which covers a LATEST edited by hand). A manifest with
    neither ``PUBLISHED`` nor a history (one written with the sharding functions alone, never through a writer
    that records its history) shows no sign of a writer that died, so it counts as complete: gc never deletes a
    version it cannot tell abandoned.
    """

    latest = read_latest(root)
    out = {}
    for v in list_versions(root):
        name = version_name(v)
        if exists(root.join(name, COLLECTED)):
            out[name] = "collected"
        elif not exists(root.join(name, MANIFEST)):
            out[name] = "unfinished"
        elif name == latest or exists(root.join(name, PUBLISHED)):
            out[name] = "complete"
        else:
            try:
                has_history = bool(read_index_manifest(root.join(name)).history)
            except RagtuneError:
                has_history = True  # unreadable: never a version to keep
            out[name] = "abandoned" if has_history else "complete"
    return out


def mark_latest_published(root: Location) -> None:
    """Write ``PUBLISHED`` into the version LATEST names, if missing (LATEST switched by hand). Writers call
    it under the lock before they start, so that a version LATEST named is never taken for abandoned."""

    latest = read_latest(root)
    if latest and exists(root.join(latest, MANIFEST)) and not exists(root.join(latest, PUBLISHED)):
        atomic_write_bytes(root.join(latest, PUBLISHED), json.dumps({"published_at": time.time()}).encode())


def next_version(root: Location) -> str:
    """The name of the next version folder: the highest number on disk + 1 (complete, collected or left by a
    writer that died: never reused, so no reader can mistake one for another). Call it under the writer lock."""

    mark_latest_published(root)
    states = version_states(root)
    for name, state in states.items():
        if state in ("unfinished", "abandoned"):
            log.warning("%s was left by a write that did not finish (%s); LATEST never named it and no reader "
                        "opens it; `ragtune index gc` removes it", name,
                        "no manifest" if state == "unfinished" else "its writer died before switching LATEST")
    return version_name(int(list(states)[-1].split("-")[1]) + 1 if states else 1)


# --- garbage collection -----------------------------------------------------------------------------------------

@dataclass
class GcPlan:
    """What gc keeps and deletes, and why."""

    keep: dict[str, str]  # version -> reason
    delete: list[str]  # complete versions whose manifest goes
    incomplete: list[str]  # folders left by writers that died
    files: list[str]  # files to delete, relative to the root
    expired_leases: list[str]


def plan_gc(root: Location, keep_n: int, grace_s: float = GRACE_S, now: float | None = None) -> GcPlan:
    """Decide what ``gc`` deletes: every complete version except the ``keep_n`` newest, the one ``LATEST``
    names, those with an unexpired lease and those superseded less than ``grace_s`` ago; of those, every file
    that no kept version's manifest names (files are shared between versions)."""

    if keep_n < 1:
        raise RagtuneError(f"--keep {keep_n}: gc keeps at least the newest version. Fix: --keep 1 or more")
    now = time.time() if now is None else now
    mark_latest_published(root)
    latest = read_latest(root)
    states = version_states(root)
    names = list(states)
    complete = [v for v in names if states[v] == "complete"]
    incomplete = [v for v in names if states[v] in ("unfinished", "abandoned")]
    manifests = {v: read_index_manifest(root.join(v)) for v in complete}
    keep: dict[str, str] = {}
    for v in complete[-keep_n:]:
        keep[v] = f"one of the {keep_n} newest"
    if latest in manifests:
        keep[latest] = "LATEST"
    leases = read_leases(root)
    expired = [le["file"] for le in leases if le.get("expires_at", 0) <= now]
    for le in leases:
        if le.get("expires_at", 0) > now and le.get("version") in complete + incomplete:
            keep.setdefault(le["version"], f"leased by {le.get('owner')} (pid {le.get('pid')} on {le.get('host')})")
    for v in incomplete:  # an abandoned version a reader opened by its folder: kept while leased
        if v in keep and exists(root.join(v, MANIFEST)):
            manifests[v] = read_index_manifest(root.join(v))
    incomplete = [v for v in incomplete if v not in keep]
    for i, v in enumerate(complete[:-1]):  # superseded when the next complete version was written
        successor = manifests[complete[i + 1]].created_at
        if v not in keep and now - successor < grace_s:
            keep[v] = f"superseded {now - successor:,.0f}s ago (< grace {grace_s:,.0f}s)"
    referenced = {root_relative(v, f) for v in keep for f in manifest_files(manifests[v])}
    delete = [v for v in complete if v not in keep]
    files = []
    for v in delete + incomplete + [v for v in names if states[v] == "collected"]:
        files += [f"{v}/{f}" for f in list_files(root.join(v)) if f"{v}/{f}" not in referenced and f != COLLECTED]
    return GcPlan(keep, delete, incomplete, files, expired)


def collect(root: Location, plan: GcPlan) -> None:
    """Carry out a plan (under the writer lock). Per version: a ``COLLECTED`` marker first, then its manifest
    goes (no reader can open it from then on), then its unshared files; a folder left empty is removed. A gc
    that dies midway leaves folders the next gc finishes."""

    for v in plan.delete:
        atomic_write_bytes(root.join(v, COLLECTED), json.dumps({"collected_at": time.time()}).encode())
        delete_file(root.join(v, MANIFEST))
    for f in plan.files:
        delete_file(root.join(f))
    for v in {f.split("/", 1)[0] for f in plan.files} | set(plan.delete) | set(plan.incomplete):
        if [f for f in list_files(root.join(v)) if f != COLLECTED] == []:
            delete_file(root.join(v, COLLECTED))
            delete_dir_if_empty(root.join(v))
    for name in plan.expired_leases:
        delete_file(root.join(LEASES, name))


def gc_versions(root: Location, keep: int, grace_s: float = GRACE_S, dry_run: bool = False) -> GcPlan:
    """``ragtune index gc``: take the writer lock, plan (:func:`plan_gc`) and, unless ``dry_run``, collect."""
    with WriterLock(root, f"ragtune index gc --keep {keep}"):
        plan = plan_gc(root, keep, grace_s)
        if not dry_run:
            collect(root, plan)
    return plan
