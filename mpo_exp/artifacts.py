"""A content-addressed cache for stage outputs (models, pairs, score tensors).

Every artifact is a pure function of the config that made it, so its directory is named by a
hash of that config. Writes go to a temporary sibling directory that is renamed into place only
when complete (rename is atomic on POSIX), and a per-artifact file lock makes concurrent jobs
wait for one builder instead of training the same model twice.

Temporary directories
    A builder writes into ``<kind>/<key>.tmp-<host>-<pid>-<rand>`` while holding the per-key lock
    ``<kind>/<key>.lock``. A build that raises (any exception, Ctrl-C included) removes its own
    temporary directory before re-raising, so a failed build leaves nothing behind. A job killed
    outright (SIGKILL, node failure) cannot clean up, so temporaries are also swept:

    * when a store is constructed (every kind under the root) and on every ``get_or_build`` (that
      kind's directory), a temporary is removed only if it was made **on this host** by a pid
      that is **no longer alive** here, and only while holding its key's lock without waiting (a
      live builder holds that lock, so a temporary whose lock is busy is never touched). The host
      check keeps one host from judging another host's pids on a shared file system; temporaries
      from other hosts, or in the older ``<key>.tmp-<pid>-<rand>`` form, are left to the rule below.
    * a builder that holds a key's lock removes every temporary of that key before it starts: the
      lock proves that no one else is building it (this relies on ``flock`` being honoured across
      hosts, as the one-builder guarantee itself does).

Integrity
    When an artifact is finished, ``meta.json`` records the size and sha256 of every file in it
    (``"files": {relative path: {"size", "sha256"}}``). When it is reused, the files are checked
    at the store's verification level:

    * ``"hash"`` (default): sizes and sha256 of every file. This reads the whole artifact once
      more, and hashing is I/O- and CPU-bound: measured on the development machine (files in the
      page cache, SHA-NI), sha256 ran at 0.55-1.2 GB/s on one core (depending on load from other
      jobs) and 2.3 GB/s over 4 shards on its 2 cores -- files are hashed in up to 4 threads, as
      hashlib releases the GIL. So a 1.5 GB model costs ~1-3 s and a 14 GB (7B fp16) model
      ~5-25 s per reuse, more when the file system, not the CPU, is the bottleneck. A directory
      verified once is not hashed again by the same store while its files' sizes, mtimes and
      inodes are unchanged. Building costs one extra read of the new files (still cached).
    * ``"size"``: sizes only (catches truncation and missing files, not in-place corruption).
    * ``"none"``: no checks (the pre-integrity behaviour).

    Choose with ``ArtifactStore(root, verify=...)`` or, for the pipeline, the environment
    variable ``MPO_ARTIFACT_VERIFY`` (read when ``verify`` is not given). Files in an artifact
    that ``meta.json`` does not list are ignored.

    On a mismatch the store logs a warning naming the directory and the files that differ, moves
    the artifact aside to ``<kind>/<key>.corrupt-<host>-<pid>-<rand>`` (never read again; kept
    for inspection and safe to delete) and rebuilds it under the lock, so the run continues
    correctly; if the rebuild fails, :class:`CorruptArtifactError` names the cache directory. A
    directory without a readable ``meta.json`` is treated the same way. Artifacts built before
    hashes were recorded are accepted unchecked, with one warning per directory per process.

Several processes of one job (DDP, torchrun)
    ``get_or_build`` is then collective: every rank runs the build (training stages need every
    rank), rank 0 alone takes the lock and publishes, the others discard their copy and return
    rank 0's artifact.

Shared file systems (``hydra/launcher=slurm``: jobs on several nodes, one cache)
    The root must be the same directory on every node (an absolute ``MPO_EXP_CACHE`` on the shared
    file system). The one-builder guarantee then rests on three things:

    * ``flock`` on ``<key>.lock`` excludes across hosts. Linux NFS clients (>= 2.6.12) emulate
      ``flock`` with a whole-file POSIX lock sent to the server (NLM, i.e. ``rpc.statd``/``lockd``
      running, for NFSv3; built into NFSv4) -- unless mounted ``nolock`` or ``local_lock=flock|all``,
      which make it node-local. Emulated exclusive locks need the file open for writing, hence the
      ``"a"`` mode. Lustre needs ``flock`` among the client's mount options (``localflock`` is
      node-local, ``noflock`` makes it fail); BeeGFS needs ``tuneUseGlobalFileLocks = true`` (the
      default ``false`` is node-local). Check a mount with
      ``flock -x <dir>/t sleep 60`` on one node while ``flock -n <dir>/t true`` fails on another.
      Where ``flock`` fails (ENOLCK, ENOSYS), ``get_or_build`` raises and the job stops. Where it is
      silently node-local, jobs on different nodes build the same artifact at once: compute is
      wasted, a builder may delete another node's temporary (the rule above), and the later
      ``os.replace`` fails with "Directory not empty", so that job fails; the artifact in place is
      complete, and re-running the sweep reuses it.
    * ``os.replace`` of the temporary onto ``<kind>/<key>`` is one ``rename`` within one directory,
      atomic on the server (NFS RENAME included), so readers see no artifact or a whole one. An NFS
      client may cache "absent" for up to ``acdirmax`` (60 s by default) and so rebuild an artifact
      that another node just finished (the failure above); ``lookupcache=positive`` avoids it.
    * Temporaries are named ``<host>-<pid>``: only the host that made one judges whether its pid is
      alive, so hostnames must be unique per node (pids of other hosts mean nothing here). Even a
      wrong "dead" verdict removes nothing while the builder lives, as it holds the key's lock. A
      job killed on another node (time limit, node failure) leaves its temporary until the next
      builder of that key removes it. The kernel drops a killed process's lock, but a node that
      dies holds its NFS locks until the NFSv4 lease expires (90 s by default) or, with NFSv3, until
      it reboots, and jobs waiting on that key wait as long.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo_exp import distributed as dist

log = logging.getLogger(__name__)

META = "meta.json"
VERIFY_ENV = "MPO_ARTIFACT_VERIFY"
VERIFY_LEVELS = ("hash", "size", "none")

_TMP_RE = re.compile(r"^(?P<key>.+?)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)-(?P<rand>[0-9a-f]+)$")
_legacy_warned: set[str] = set()


class CorruptArtifactError(RuntimeError):
    """A cached artifact failed its integrity check and could not be rebuilt."""


def config_key(spec: Any) -> str:
    """Stable short hash of a JSON-serialisable spec."""
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "unknown-host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # unknown: be conservative
    return True


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != META)


def hash_files(root: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` for every file under ``root`` but ``meta.json``."""
    files = _files(root)
    workers = max(1, min(4, os.cpu_count() or 1, len(files)))
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL: shards hash in parallel
        digests = list(pool.map(_sha256, files))
    return {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": d}
        for p, d in zip(files, digests, strict=True)
    }


@dataclass(frozen=True)
class Artifact:
    kind: str
    key: str
    path: Path
    meta: dict
    reused: bool


class ArtifactStore:
    def __init__(self, root: str | os.PathLike, verify: str | None = None) -> None:
        self.root = Path(root)
        verify = verify if verify is not None else os.environ.get(VERIFY_ENV, "hash")
        verify = verify.strip().lower()
        if verify not in VERIFY_LEVELS:
            raise ValueError(
                f"artifact verification must be one of {VERIFY_LEVELS} "
                f"(ArtifactStore(verify=...) or ${VERIFY_ENV}), got {verify!r}"
            )
        self.verify = verify
        self._host = _host()
        self._verified: dict[Path, tuple] = {}
        self.sweep()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    # ---- temporaries -----------------------------------------------------------------------
    def _tmp_name(self, key: str) -> str:
        return f"{key}.tmp-{self._host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def sweep(self, kind: str | None = None) -> list[Path]:
        """Remove temporaries left by dead builders on this host (see the module docstring)."""
        if kind is not None:
            dirs = [self.root / kind]
        elif self.root.is_dir():
            dirs = [d for d in self.root.iterdir() if d.is_dir()]
        else:
            dirs = []
        removed = []
        for d in dirs:
            try:
                entries = list(d.iterdir())
            except OSError:  # gone, or not ours to list
                continue
            for tmp in entries:
                m = _TMP_RE.match(tmp.name)
                if not m or m["host"] != self._host or _pid_alive(int(m["pid"])):
                    continue
                with self._try_lock(d / f"{m['key']}.lock") as locked:
                    if locked and tmp.exists():
                        shutil.rmtree(tmp, ignore_errors=True)
                        removed.append(tmp)
        if removed:
            log.info("removed %d stale temporary artifact dir(s) of dead builders: %s", len(removed), removed)
        return removed

    @staticmethod
    @contextmanager
    def _try_lock(lock_path: Path) -> Iterator[bool]:
        """Hold ``lock_path``'s lock if no one else does; yields whether it is held."""
        try:
            f = open(lock_path, "a")  # noqa: SIM115 -- closed below, around the yield
        except OSError as e:  # e.g. a read-only cache: leave everything as it is
            log.debug("could not open %s: %s", lock_path, e)
            yield False
            return
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live builder (or locking unsupported): do not touch
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        finally:
            f.close()

    # ---- build / reuse ---------------------------------------------------------------------
    def get_or_build(
        self, kind: str, spec: dict, build: Callable[[Path], dict | None], label: str | None = None
    ) -> Artifact:
        """Return the artifact for ``spec``, building it with ``build(tmp_dir)`` if absent.

        ``build`` writes its files into ``tmp_dir`` and may return extra metadata (e.g. cost).
        A cached artifact that fails verification is moved aside and rebuilt. Under DDP the call
        is collective (see :meth:`_get_or_build_collective`).
        """
        if dist.world_size() > 1:
            return self._get_or_build_collective(kind, spec, build, label)
        return self._get_or_build(kind, spec, build, label)

    def _get_or_build_collective(
        self, kind: str, spec: dict, build: Callable[[Path], dict | None], label: str | None
    ) -> Artifact:
        """Every rank runs ``build`` (it may train under DDP, a collective); rank 0 alone publishes.

        Rank 0 decides as one process would (reuse, or build under the file lock) and announces
        ``("build",)`` before building; the other ranks then build into their own temporaries,
        which are discarded. Rank 0 ends with ``("done", meta, reused)`` or ``("error", message)``,
        and the other ranks return the artifact it published (or raise).
        """
        key = config_key(spec)
        final = self.path(kind, key)
        if dist.is_main():

            def announced(tmp: Path) -> dict | None:
                dist.broadcast_object(("build",))
                return build(tmp)

            try:
                art = self._get_or_build(kind, spec, announced, label)
            except BaseException as e:
                dist.broadcast_object(("error", f"{type(e).__name__}: {e}"))
                raise
            dist.broadcast_object(("done", art.meta, art.reused))
            return art
        msg = dist.broadcast_object(None)
        if msg[0] == "build":
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / self._tmp_name(key)
            tmp.mkdir()
            try:
                build(tmp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            msg = dist.broadcast_object(None)
        if msg[0] == "error":
            raise RuntimeError(f"rank 0 failed to build {label or kind} at {final}: {msg[1]}")
        _, meta, reused = msg
        return Artifact(kind, key, final, meta, reused=reused)

    def _get_or_build(
        self, kind: str, spec: dict, build: Callable[[Path], dict | None], label: str | None = None
    ) -> Artifact:
        key = config_key(spec)
        final = self.path(kind, key)
        label = label or kind
        final.parent.mkdir(parents=True, exist_ok=True)
        self.sweep(kind)
        if (final / META).exists():
            meta, problems = self._check(final)
            if not problems:
                return self._reused(kind, key, final, label, meta)
        with open(final.parent / f"{key}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another job may be building it: wait
            try:
                return self._build_locked(kind, key, spec, final, label, build)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _build_locked(
        self, kind: str, key: str, spec: dict, final: Path, label: str, build: Callable[[Path], dict | None]
    ) -> Artifact:
        aside = None
        problems: list[str] = []
        if final.exists():  # re-check under the lock: another job may have (re)built it meanwhile
            meta, problems = self._check(final)
            if not problems:
                return self._reused(kind, key, final, label, meta)
            aside = final.parent / f"{key}.corrupt-{self._host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            os.replace(final, aside)
            log.warning(
                "cached %s at %s failed its integrity check (%s); moved it aside to %s "
                "(never read again; safe to delete) and rebuilding it",
                label,
                final,
                "; ".join(problems),
                aside,
            )
        for stale in final.parent.glob(f"{key}.tmp-*"):  # we hold the lock: no one else is building it
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / self._tmp_name(key)
        tmp.mkdir()
        log.info("building %s -> %s", label, final)
        try:
            start = time.perf_counter()
            extra = build(tmp) or {}
            meta = {"kind": kind, "key": key, "spec": spec, "build_wall_s": time.perf_counter() - start}
            meta.update(extra)
            meta["integrity"] = "sha256"
            meta["files"] = hash_files(tmp)
            (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
            os.replace(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if aside is not None and isinstance(e, Exception):
                raise CorruptArtifactError(
                    f"the cached {label} at {final} was corrupt ({'; '.join(problems)}; moved to {aside}) "
                    f"and rebuilding it failed: {type(e).__name__}: {e}"
                ) from e
            raise
        self._remember(final, meta)
        return Artifact(kind, key, final, meta, reused=False)

    # ---- verification ----------------------------------------------------------------------
    def _check(self, final: Path) -> tuple[dict, list[str]]:
        """(meta, problems) for a finished-looking artifact; no problems means it may be used."""
        try:
            meta = json.loads((final / META).read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            return {}, [f"{META}: missing"]
        except (OSError, ValueError) as e:
            return {}, [f"{META}: unreadable ({e})"]
        if self.verify == "none":
            return meta, []
        files = meta.get("files")
        if not isinstance(files, dict):
            if str(final) not in _legacy_warned:
                _legacy_warned.add(str(final))
                log.warning(
                    "cached artifact %s predates integrity hashes: using it unchecked "
                    "(delete it to rebuild it with hashes)",
                    final,
                )
            return meta, []
        signature = self._signature(final, files)
        if signature is not None and self._verified.get(final) == signature:
            return meta, []
        problems = []
        for rel, want in sorted(files.items()):
            want = want if isinstance(want, dict) else {}
            try:
                size = (final / rel).stat().st_size
            except FileNotFoundError:
                problems.append(f"{rel}: missing")
                continue
            except OSError as e:
                problems.append(f"{rel}: unreadable ({e})")
                continue
            if size != want.get("size"):
                problems.append(f"{rel}: size {size} != recorded {want.get('size')}")
        if not problems and self.verify == "hash":

            def digest(rel: str) -> str | None:
                try:
                    return _sha256(final / rel)
                except OSError:
                    return None

            names = sorted(files)
            workers = max(1, min(4, os.cpu_count() or 1, len(names)))
            with ThreadPoolExecutor(workers) as pool:
                digests = list(pool.map(digest, names))
            for rel, got in zip(names, digests, strict=True):
                if got is None:
                    problems.append(f"{rel}: unreadable")
                elif got != files[rel].get("sha256"):
                    problems.append(f"{rel}: sha256 differs from the recorded hash")
        if not problems and self.verify == "hash" and signature is not None:
            self._verified[final] = signature
        return meta, problems

    @staticmethod
    def _signature(final: Path, files: dict) -> tuple | None:
        try:
            stats = [(rel, (final / rel).stat()) for rel in sorted(files)]
        except OSError:
            return None
        return tuple((rel, st.st_size, st.st_mtime_ns, st.st_ino) for rel, st in stats)

    def _remember(self, final: Path, meta: dict) -> None:
        signature = self._signature(final, meta.get("files", {}))
        if signature is not None:
            self._verified[final] = signature

    def _reused(self, kind: str, key: str, final: Path, label: str, meta: dict) -> Artifact:
        log.info("reusing cached %s from %s (built in %.1f s)", label, final, meta.get("build_wall_s", 0.0))
        return Artifact(kind, key, final, meta, reused=True)
