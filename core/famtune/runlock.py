"""One run per output directory: an OS-level lock, the run's identity, and what may change on resume.

``OUTPUT/run.json`` names the run (a random id) and the hash of the recipe keys that change what is
trained. Every checkpoint records both, so ``--resume`` continues only the run that wrote the
checkpoint, with the same training-relevant keys. The lock (``OUTPUT/.famtune.lock``, an
``flock`` through filelock) is held for the whole run and released by the OS if the process dies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from famtune.errors import FamtuneError

RUN_FILE = "run.json"
LOCK_FILE = ".famtune.lock"

# Keys that may change on --resume: they decide what is logged, evaluated or saved, not what is learned.
# max_steps/epochs may change too (the schedule rule in famtune.schedule); everything else may not.
SAFE_ON_RESUME = frozenset(
    {
        "output_dir",
        "eval_data",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "evaluation_inputs",
        "max_new_tokens",
        "progress",
        "trust_remote_code",
        "gradient_checkpointing",
        "nan_policy",
        "report_to",
    }
)
BUDGET_KEYS = frozenset({"max_steps", "epochs"})
# What a run leaves in its directory; --overwrite removes exactly these, nothing the user put there.
RUN_OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "summary.json",
    "loss.png",
    "recipe.yaml",
    "famtune.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",
    RUN_FILE,
)


def data_digest(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def identity(recipe: Any) -> dict[str, Any]:
    """The recipe keys that change what is trained, with the data file's content hash."""
    values = {k: v for k, v in recipe.to_dict().items() if k not in SAFE_ON_RESUME and k not in BUDGET_KEYS}
    values["data"] = {"path": recipe.data, "sha256": data_digest(recipe.data)}
    # What is trained depends on the global batch, not on how it is split across processes: a run
    # of 2 processes x batch 4 resumes as 1 process x batch 8 and back.
    from famtune.distributed import world_size

    values["global_batch_size"] = values.pop("batch_size") * world_size()
    return json.loads(json.dumps(values, default=str))  # as a checkpoint's JSON reads it back


def identity_hash(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_changes(before: dict[str, Any], now: dict[str, Any]) -> str:
    """A one-line diff: ``learning_rate 0.0002 -> 0.001, data (content changed)``."""
    parts = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if a == b:
            continue
        if key == "data" and isinstance(a, dict) and isinstance(b, dict) and a.get("path") == b.get("path"):
            parts.append("data (file content changed)")
        elif key == "data" and isinstance(a, dict) and isinstance(b, dict):
            parts.append(f"data {a.get('path')} -> {b.get('path')}")
        else:
            parts.append(f"{key} {a!r} -> {b!r}")
    return ", ".join(parts)


def earlier_run(out: Path) -> str | None:
    """What in ``out`` belongs to an earlier run and would be lost or mixed in by a new one."""
    from famtune.run_state import checkpoint_dirs

    if (out / "summary.json").exists():  # (famtune compare removes it to re-run a model on purpose)
        return "a finished run"
    ckpts = checkpoint_dirs(out)
    if ckpts:
        return f"an earlier run's {len(ckpts)} checkpoint(s) (newest {ckpts[0].name})"
    return None


def read_run(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_run(out: Path, run: dict[str, Any]) -> None:
    tmp = out / (RUN_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(run, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / RUN_FILE)


class RunDirectory:
    """The locked output directory of one run (a context manager)."""

    def __init__(self, recipe: Any, resume: str | bool | None, overwrite: bool = False, log=print) -> None:
        self.recipe = recipe
        self.out = Path(recipe.output_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.log = log
        self.lock = None
        self.run: dict[str, Any] = {}
        self.identity = identity(recipe)

    def __enter__(self) -> RunDirectory:
        from filelock import FileLock, Timeout

        # In a launched multi-process run, rank 0 owns the directory (lock, run.json, clearing);
        # the other ranks write nothing there and only read what rank 0 verified.
        self.owner = os.environ.get("RANK", "0") == "0"
        if not self.owner:
            self.created = False
            self.run = read_run(self.out) or {"run_id": None}
            return self
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FamtuneError(f"output_dir: {self.out}: cannot create it ({exc.strerror}); choose another") from None
        self.lock = FileLock(str(self.out / LOCK_FILE), timeout=0, is_singleton=False)
        try:
            self.lock.acquire()
        except Timeout:
            raise FamtuneError(
                f"output_dir: {self.out} is in use by another famtune train; wait for it to finish "
                "or choose another output_dir"
            ) from None
        except OSError as exc:
            raise FamtuneError(
                f"output_dir: {self.out}: cannot lock it ({exc.strerror}); choose a writable local directory"
            ) from None
        try:
            self._claim()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.owner:
            return False
        # A run that failed before writing anything of its own leaves no directory behind.
        if exc_type is not None and self.created and self._holds_nothing():
            shutil.rmtree(self.out, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()
        return False

    def _holds_nothing(self) -> bool:
        if not self.out.is_dir():
            return False
        names = set(os.listdir(self.out))
        metrics = self.out / "metrics.jsonl"
        return names <= {RUN_FILE, LOCK_FILE, "metrics.jsonl"} and (not metrics.exists() or metrics.stat().st_size == 0)

    def _claim(self) -> None:
        if self.resume:
            # Without run.json (checkpoints copied here, or passed as a path) the checkpoint's own run
            # is adopted; its training-relevant keys are still checked against the recipe.
            self.run = read_run(self.out) or {"run_id": None, "created": time.time()}
            return
        found = earlier_run(self.out)
        if found and not self.overwrite:
            raise FamtuneError(
                f"output_dir: {self.out} holds {found}; continue it with --resume, "
                "or pass --overwrite to replace it (or choose another output_dir)"
            )
        if found or self.overwrite:
            self._clear()
        from famtune.run_state import clean_stale

        clean_stale(self.out, self.log)  # partial writes of a run killed before its first checkpoint
        self.run = {
            "run_id": uuid.uuid4().hex,
            "created": time.time(),
            "finished": False,
            "identity_hash": identity_hash(self.identity),
        }
        write_run(self.out, self.run)

    def _clear(self) -> None:
        removed = []
        for name in RUN_OUTPUTS:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
                removed.append(name)
            elif path.exists():
                path.unlink()
                removed.append(name)
        if removed:
            self.log(f"famtune: --overwrite: removed the earlier run's {', '.join(removed)} from {self.out}")

    def verify_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint of another run, or of this run with training-relevant keys changed."""
        if not self.owner:  # rank 0 verifies; a refusal there ends every rank
            return
        ckpt_run = state.get("run_id")
        if ckpt_run is None:
            raise FamtuneError(
                f"{path}: written without a run id (an older famtune); it cannot be verified, "
                "start again with --overwrite"
            )
        if ckpt_run != self.run.get("run_id"):
            if read_run(self.out) is None:  # resuming a checkpoint kept elsewhere into a fresh directory
                self.run["run_id"] = ckpt_run
            else:
                raise FamtuneError(
                    f"{path}: belongs to another run than {self.out / RUN_FILE}; "
                    "resume the run that wrote it, or start again with --overwrite"
                )
        before = state.get("identity") or {}
        changed = describe_changes(before, self.identity)
        if changed:
            raise FamtuneError(
                f"--resume: changed since {path.name}: {changed}; only logging, eval, save and "
                "step-budget keys may change on resume; restore them, or start a new run "
                "with --overwrite or another output_dir"
            )
        self.run["identity_hash"] = identity_hash(self.identity)
        self.run["finished"] = False
        write_run(self.out, self.run)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"run_id": self.run["run_id"], "identity": self.identity, "identity_hash": identity_hash(self.identity)}

    def finish(self) -> None:
        if not self.owner:
            return
        self.run["finished"] = True
        self.run["finished_at"] = time.time()
        write_run(self.out, self.run)
