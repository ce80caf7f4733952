"""The results file of one op family on one GPU: ``<out>/<gpu>/<family>.json``.

Runs append to it. Each run records where and when it ran (device, versions, commit, the
ceilings it measured); each measurement records its run, its case, its implementation and
its numbers or its error. A run resumes: a (case, implementation) already measured
(``ok`` or ``error``) at the same code version is skipped, so an interrupted run picks up
where it stopped; ``fresh=True`` starts the file over.

The code version is the git commit of a clean checkout. With uncommitted changes, or no git
at all (a device machine that got a copy of the tree without ``.git``), it is the commit
(or ``FUSEDOPS_GIT_COMMIT``, or "unknown") plus a hash of the package's sources, so results
of different code are never mixed up.

A measurement is written as ``running`` before it starts and replaced when it ends. One
still ``running`` when the next run loads the file was cut off by a crash, a hang or a
kill: it becomes an ``error`` ("interrupted"), so a case that hangs the GPU is not retried
forever (``--fresh`` retries it). Every write goes to a temporary file first and is renamed
over the old one, so a kill mid-write never leaves half a file.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

SCHEMA = 1
DONE = ("ok", "error")
INTERRUPTED = ("interrupted: the process ended while this was running (a crash, a hang or "
               "a kill); rerun with --fresh to measure it again")
COMMIT_ENV_VAR = "FUSEDOPS_GIT_COMMIT"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def source_fingerprint(roots: list[Path]) -> str:
    """A hash of every source file under ``roots`` (results/ and caches left out)."""
    digest = hashlib.sha256()
    suffixes = {".py", ".cu", ".cuh", ".cpp", ".h", ".hpp", ".c"}
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            parts = set(path.relative_to(root).parts)
            if (not path.is_file() or path.suffix not in suffixes or "results" in parts
                    or "__pycache__" in parts):
                continue
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code_version(commit: str, dirty: bool | None, fingerprint: str) -> tuple[str, str]:
    """(commit to record, version to resume by)."""
    if commit == "unknown":
        commit = os.environ.get(COMMIT_ENV_VAR, "").strip() or "unknown"
        dirty = None
    if dirty is False:
        return commit, commit
    return commit, f"{commit}+src.{fingerprint}"


def _key(record: dict) -> tuple[str, str]:
    return record["case_id"], record["implementation"]


class ResultsStore:
    """One family's results file: load, append runs and measurements, save atomically."""

    def __init__(self, path: Path, family: str, gpu: str, *, fresh: bool = False):
        self.path = Path(path)
        self.family = family
        self.gpu = gpu
        self.notes: list[str] = []
        self.data: dict[str, Any] = {"schema": SCHEMA, "family": family, "gpu": gpu,
                                     "runs": [], "measurements": []}
        if self.path.exists() and not fresh:
            self._load()
        self.run_id: str | None = None

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("measurements"), list):
                raise ValueError("not a results file")
        except (OSError, ValueError) as exc:
            backup = self.path.with_suffix(f".unreadable-{uuid.uuid4().hex[:6]}.json")
            self.path.rename(backup)
            self.notes.append(f"{self.path} could not be read ({exc}); moved to {backup.name} "
                              f"and started over")
            return
        self.data = data
        self.data.setdefault("runs", [])
        for record in self.data["measurements"]:
            if record.get("status") == "running":
                record["status"] = "error"
                record["error"] = INTERRUPTED

    # --- runs ---------------------------------------------------------------------------

    def start_run(self, info: dict) -> str:
        self.run_id = f"{now()}-{uuid.uuid4().hex[:6]}"
        self.data["runs"].append({"run_id": self.run_id, **info})
        return self.run_id

    def run(self, run_id: str) -> dict | None:
        for run in self.data["runs"]:
            if run["run_id"] == run_id:
                return run
        return None

    def update_run(self, **fields) -> None:
        run = self.run(self.run_id)
        if run is not None:
            run.update(fields)

    # --- measurements -------------------------------------------------------------------

    @property
    def measurements(self) -> list[dict]:
        return self.data["measurements"]

    def done(self, case_id: str, implementation: str, version: str) -> dict | None:
        """The finished measurement of this case and implementation at ``version``, if any."""
        for record in reversed(self.measurements):
            if (record["case_id"] == case_id and record["implementation"] == implementation
                    and record.get("code_version") == version and record["status"] in DONE):
                return record
        return None

    def put(self, record: dict) -> None:
        """Add a record, replacing this run's earlier record of the same case and
        implementation (its ``running`` placeholder); then save."""
        record = {"run_id": self.run_id, **record}
        for i, old in enumerate(self.measurements):
            if old.get("run_id") == self.run_id and _key(old) == _key(record):
                self.measurements[i] = record
                break
        else:
            self.measurements.append(record)
        self.save()

    def drop_running(self) -> None:
        """Forget this run's ``running`` placeholders (a clean stop, not a crash)."""
        self.data["measurements"] = [
            r for r in self.measurements
            if not (r.get("run_id") == self.run_id and r.get("status") == "running")]
        self.save()

    def current(self, version: str | None = None) -> list[dict]:
        """The latest finished or skipped record of each (case, implementation), taking only
        records at ``version`` when one is given; in first-seen order."""
        latest: dict[tuple[str, str], dict] = {}
        for record in self.measurements:
            if record["status"] == "running":
                continue
            if version is not None and record.get("code_version") != version:
                continue
            latest[_key(record)] = record
        return list(latest.values())

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, self.path)
