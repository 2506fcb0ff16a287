"""A content-addressed cache for stage outputs (models, pairs, score tensors).

Every artifact is a pure function of the config that made it, so its directory is named by a
hash of that config. Writes go to a temporary sibling directory that is renamed into place only
when complete (rename is atomic on POSIX), and a per-artifact file lock makes concurrent jobs
wait for one builder instead of training the same model twice. A job killed mid-build leaves
only a ``*.tmp-*`` directory, which is never read and is removed by the next builder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

META = "meta.json"


def config_key(spec: Any) -> str:
    """Stable short hash of a JSON-serialisable spec."""
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Artifact:
    kind: str
    key: str
    path: Path
    meta: dict
    reused: bool


class ArtifactStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get_or_build(
        self, kind: str, spec: dict, build: Callable[[Path], dict | None], label: str | None = None
    ) -> Artifact:
        """Return the artifact for ``spec``, building it with ``build(tmp_dir)`` if absent.

        ``build`` writes its files into ``tmp_dir`` and may return extra metadata (e.g. cost).
        """
        key = config_key(spec)
        final = self.path(kind, key)
        label = label or kind
        final.parent.mkdir(parents=True, exist_ok=True)
        if (final / META).exists():
            return self._reuse(kind, key, final, label)
        with open(final.parent / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another job may be building it: wait
            try:
                if (final / META).exists():
                    return self._reuse(kind, key, final, label)
                for stale in final.parent.glob(f"{key}.tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                tmp = final.parent / f"{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
                tmp.mkdir()
                log.info("building %s -> %s", label, final)
                start = time.perf_counter()
                extra = build(tmp) or {}
                meta = {"kind": kind, "key": key, "spec": spec, "build_wall_s": time.perf_counter() - start}
                meta.update(extra)
                (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
                os.replace(tmp, final)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return Artifact(kind, key, final, meta, reused=False)

    @staticmethod
    def _reuse(kind: str, key: str, final: Path, label: str) -> Artifact:
        meta = json.loads((final / META).read_text())
        log.info("reusing cached %s from %s (built in %.1f s)", label, final, meta.get("build_wall_s", 0.0))
        return Artifact(kind, key, final, meta, reused=True)
