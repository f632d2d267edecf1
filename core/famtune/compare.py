"""``famtune compare``: train several models on the same recipe, each through its own family
plugin, and write a report that shows them side by side.

Every model runs ``famtune train`` in its own subprocess, so one failing model does not stop the
others and each model's peak memory is its own. A model whose run directory already holds a
``summary.json`` from the same per-model recipe is skipped, so a re-run resumes the comparison.

``tiny:<family>`` is a model spec of its own: the family plugin builds a tiny random-weight
checkpoint (tokenizer trained on the recipe's data) in the comparison directory, so a comparison
runs with nothing downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from famtune.errors import FamtuneError

TINY_PREFIX = "tiny:"
INPUT_RECIPE = "compare-input.yaml"
STATUS_FILE = "compare-status.json"
TINY_DONE = ".famtune-tiny-complete"
DEMO_RECIPE = Path(__file__).with_name("demo_data") / "compare.yaml"
DEFAULT_OUTPUT = "famtune-compare"
# Keys that differ per model; a comparison sets them itself.
PER_MODEL_KEYS = ("model", "output_dir", "family")


@dataclass
class ModelRun:
    """One model of a comparison and where its run lives."""

    spec: str
    name: str
    out: Path
    family: str | None = None  # known before training for tiny:<family>, else found by the claim
    plugin: dict[str, str] = field(default_factory=dict)
    note: str = ""
    status: str = "pending"  # ok, failed, skipped (finished by an earlier run)
    error: str = ""
    wall_s: float | None = None
    adapter: str = ""  # an adapter method name (famtune.adapters.METHOD_KEYS) when comparing methods

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "name": self.name,
            "dir": str(self.out),
            "family": self.family,
            "plugin": self.plugin,
            "note": self.note,
            "status": self.status,
            "error": self.error,
            "wall_s": self.wall_s,
            "adapter": self.adapter,
        }


def run_name(spec: str, taken: set[str]) -> str:
    """A directory name for a model spec: readable, filesystem-safe and unique in the comparison."""
    base = spec[len(TINY_PREFIX) :] if spec.startswith(TINY_PREFIX) else Path(spec.rstrip("/")).name or spec
    base = ("tiny-" if spec.startswith(TINY_PREFIX) else "") + re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-")
    name, i = base or "model", 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def read_comparison(
    recipe_path: str, models: list[str] | None, overrides: dict[str, Any], output: str | None
) -> tuple[dict[str, Any], list[str], Path]:
    """(shared recipe keys, model specs, comparison directory) from a recipe with a ``models:`` list."""
    import yaml

    from famtune.recipe import load_recipe

    path = Path(recipe_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise FamtuneError(f"{recipe_path}: cannot read recipe ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise FamtuneError(f"{recipe_path}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise FamtuneError(f"{recipe_path}: a recipe is a mapping of keys to values, got {type(raw).__name__}")
    raw = {**raw, **overrides}
    raw.pop("adapters", None)  # compare() reads the methods list itself
    base = path.resolve().parent
    listed = raw.pop("models", None) or []
    if isinstance(listed, str):
        listed = [listed]
    single = raw.pop("model", None)
    specs = list(models or listed or ([single] if single else []))
    if not specs:
        raise FamtuneError(f"{recipe_path}: no models to compare; add a `models:` list or pass --models M1 M2 ...")
    if raw.get("family"):
        raise FamtuneError(
            f"{recipe_path}: family {raw['family']!r} would force one family on every model; "
            "remove it (each model is claimed by its own plugin) or use tiny:<family> specs"
        )
    out = Path(output or raw.pop("output_dir", None) or DEFAULT_OUTPUT)
    raw.pop("output_dir", None)
    raw.pop("family", None)
    # The per-model recipes live elsewhere, so paths relative to this recipe become absolute.
    for key in ("data", "eval_data"):
        v = raw.get(key)
        if isinstance(v, str) and v and not Path(v).is_absolute() and (base / v).exists():
            raw[key] = str(base / v)
    ev = raw.get("eval")
    if (
        isinstance(ev, dict)
        and isinstance(ev.get("data"), str)
        and not Path(ev["data"]).is_absolute()
        and (base / ev["data"]).exists()
    ):
        raw["eval"] = {**ev, "data": str(base / ev["data"])}
    specs = [
        str(base / s) if not s.startswith(TINY_PREFIX) and not Path(s).is_absolute() and (base / s).is_dir() else s
        for s in map(str, specs)
    ]
    # Unknown keys and wrong types stop the comparison here, not once per model minutes later.
    load_recipe(None, {**raw, "model": "placeholder", "output_dir": str(out)})
    return raw, specs, out.resolve()


def tiny_corpus(shared: dict[str, Any]) -> list[str]:
    """Texts the tiny tokenizer is trained on: every message of the data, plus the eval prompts."""
    from famtune.data import read_conversations

    texts: list[str] = []
    for key in ("data", "eval_data"):
        if shared.get(key):
            report = read_conversations(shared[key], shared.get("data_format", "auto"), skip_bad_records=True)
            texts += [m["content"] for c in report.conversations for m in c.messages]
    texts += list(shared.get("evaluation_inputs") or [])
    if shared.get("system"):
        texts.append(shared["system"])
    return texts


def build_tiny(family: str, work: Path, corpus: list[str]) -> Path:
    """The tiny checkpoint of ``family`` under ``work``, built once and reused by re-runs."""
    from famtune.plugins import get_plugins

    target = work / "tiny-bases" / family
    if (target / TINY_DONE).is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    fam = get_plugins().claim({}, "", family=family)
    if not fam.tiny_checkpoint(str(target), corpus):
        raise FamtuneError(f"{fam.info.describe()} cannot build a tiny {family} checkpoint; compare another family")
    (target / TINY_DONE).write_text(family + "\n", encoding="utf-8")
    return target


def _lookup_family(spec: str, family: str | None) -> Any:
    """The plugin's ``Family`` for a model, or None when it cannot be told without training."""
    from famtune.plugins import get_plugins

    try:
        if family:
            return get_plugins().claim({}, "", family=family)
        if Path(spec).is_dir():
            from famtune.checkpoint import open_checkpoint

            return open_checkpoint(spec).family
    except Exception:  # the training subprocess reports the real error in the model's row
        return None
    return None


def model_recipe(shared: dict[str, Any], run: ModelRun, model_path: str, fam: Any) -> dict[str, Any]:
    from famtune.adapters import method_overrides

    recipe = {
        **shared,
        **(method_overrides(run.adapter) if run.adapter else {}),
        "model": model_path,
        "output_dir": str(run.out),
    }
    if run.family:
        recipe["family"] = run.family
    masking = shared.get("masking")
    if masking and fam is not None and masking not in fam.masking_policies():
        recipe.pop("masking")
        run.note = f"masking {masking!r} not offered by {fam.name}; family default used"
    return recipe


def last_error_line(log: Path) -> str:
    """The line of a training log that says what went wrong (progress bars left out)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "no log written"
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip() and not ln.lstrip().startswith("train:")]
    for ln in reversed(lines):
        if ln.startswith("famtune: error:"):
            return ln.removeprefix("famtune: error:").strip()
    return lines[-1] if lines else "exited without output"


def _progress(run_out: Path) -> tuple[int, float] | None:
    """(last logged step, its elapsed seconds) from a running model's metrics.jsonl."""
    try:
        lines = (run_out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "elapsed_s" in rec:
            return rec["step"], rec["elapsed_s"]
    return None


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Runner:
    """Runs the models one after another and reports progress with an ETA."""

    def __init__(
        self,
        shared: dict[str, Any],
        runs: list[ModelRun],
        work: Path,
        log: Callable[[str], Any],
        poll_s: float = 2.0,
        train_args: list[str] | None = None,
    ) -> None:
        self.shared, self.runs, self.work, self.log, self.poll_s = shared, runs, work, log, poll_s
        self.train_args = list(train_args or [])  # e.g. --nproc N: each model trained distributed
        self.walls: list[float] = []
        self.total_steps = int(shared.get("max_steps") or 0)

    def run_all(self) -> None:
        import yaml

        corpus: list[str] | None = None
        n = len(self.runs)
        for i, run in enumerate(self.runs, 1):
            tag = f"compare [{i}/{n}] {run.spec}"
            run.out.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            try:
                model_path = run.spec
                if run.family and run.spec.startswith(TINY_PREFIX):
                    corpus = tiny_corpus(self.shared) if corpus is None else corpus
                    model_path = str(build_tiny(run.family, self.work, corpus))
                fam = _lookup_family(model_path, run.family)
                if fam is not None:
                    run.family, run.plugin = fam.name, fam.describe()
                text = yaml.safe_dump(
                    model_recipe(self.shared, run, model_path, fam), sort_keys=False, allow_unicode=True
                )
            except Exception as exc:  # a model that cannot even be prepared is one failed row
                self._finish(run, tag, t0, "failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                continue
            recipe_file = run.out / INPUT_RECIPE
            same_recipe = recipe_file.is_file() and recipe_file.read_text(encoding="utf-8") == text
            if same_recipe and (run.out / "summary.json").is_file():
                self._skip(run, tag)
                continue
            if not same_recipe:
                # A run of another recipe must neither count as finished nor be resumed from.
                shutil.rmtree(run.out / "checkpoints", ignore_errors=True)
                (run.out / "summary.json").unlink(missing_ok=True)
            recipe_file.write_text(text, encoding="utf-8")
            if run.note:
                self.log(f"{tag}: {run.note}")
            resume = same_recipe and any((run.out / "checkpoints").glob("step-*/trainer_state.json"))
            self.log(
                f"{tag} ({run.family or 'family from the claim'}): training"
                + (", resuming from its last checkpoint" if resume else "")
                + (f"; ETA of the comparison {_clock(self._mean() * (n - i + 1))}" if self.walls else "")
            )
            code = self._train(recipe_file, run, resume, tag, remaining_after=n - i)
            if code == 0 and (run.out / "summary.json").is_file():
                self._finish(run, tag, t0, "ok", "")
            else:
                self._finish(run, tag, t0, "failed", last_error_line(run.out / "train.log"))

    def _mean(self) -> float:
        return sum(self.walls) / len(self.walls)

    def _train(self, recipe_file: Path, run: ModelRun, resume: bool, tag: str, remaining_after: int) -> int:
        cmd = (
            [sys.executable, "-m", "famtune.cli", "train", str(recipe_file)]
            + (["--resume"] if resume else [])
            + self.train_args
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(run.out / "train.log", "w", encoding="utf-8") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
            started, shown, last_print = time.perf_counter(), None, 0.0
            try:
                while True:
                    try:
                        return proc.wait(timeout=self.poll_s)
                    except subprocess.TimeoutExpired:
                        pass
                    now = time.perf_counter()
                    prog = _progress(run.out)
                    if prog and prog[0] != shown and now - last_print >= 5:
                        shown, last_print = prog[0], now
                        self.log(self._progress_line(tag, prog, now - started, remaining_after))
            except KeyboardInterrupt:
                # The child got the same Ctrl-C and saves a checkpoint; wait for it so a re-run resumes.
                proc.wait()
                raise

    def _progress_line(self, tag: str, prog: tuple[int, float], wall: float, remaining_after: int) -> str:
        step, elapsed = prog
        line = f"{tag}: step {step}" + (f"/{self.total_steps}" if self.total_steps else "")
        if self.total_steps and step:
            left = elapsed / step * (self.total_steps - step)
            others = (self._mean() if self.walls else wall + left) * remaining_after
            line += f", ETA this model {_clock(left)}, comparison {_clock(left + others)}"
        return line

    def _skip(self, run: ModelRun, tag: str) -> None:
        earlier = read_status(run.out)
        run.status, run.wall_s = "skipped", earlier.get("wall_s")
        run.plugin = run.plugin or earlier.get("plugin") or {}
        self.log(f"{tag}: finished by an earlier run, skipped")

    def _finish(self, run: ModelRun, tag: str, t0: float, status: str, error: str) -> None:
        run.status, run.error, run.wall_s = status, error, time.perf_counter() - t0
        self.walls.append(run.wall_s)
        (run.out / STATUS_FILE).write_text(
            json.dumps(run.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        self.log(
            f"{tag}: {'done' if status == 'ok' else 'FAILED'} in {run.wall_s:.0f}s" + (f": {error}" if error else "")
        )


def read_status(run_out: Path) -> dict[str, Any]:
    try:
        return json.loads((run_out / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def adapter_methods(recipe_path: str, adapters: list[str] | None, shared: dict[str, Any]) -> list[str]:
    """The adapter methods to compare (``--adapters`` or the recipe's ``adapters:`` list), each checked
    against the shared recipe before anything trains; empty when the comparison is of models only."""
    import yaml

    from famtune.adapters import method_overrides
    from famtune.recipe import load_recipe

    if adapters is None:
        try:
            listed = (yaml.safe_load(Path(recipe_path).read_text(encoding="utf-8")) or {}).get("adapters")
        except (OSError, yaml.YAMLError, AttributeError):
            listed = None
        adapters = [listed] if isinstance(listed, str) else list(listed or [])
    names = [n.strip() for a in adapters for n in str(a).split(",") if n.strip()]
    for name in names:
        try:
            load_recipe(None, {**shared, **method_overrides(name), "model": "placeholder"})
        except FamtuneError as exc:
            raise FamtuneError(f"adapter method {name!r}: {str(exc).removeprefix('command line: ')}") from None
    return names


def compare(
    recipe_path: str | None,
    models: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    output: str | None = None,
    log: Callable[[str], Any] = print,
    adapters: list[str] | None = None,
    nproc: int | None = None,
) -> int:
    """Run the comparison and write its report; 0 when every model trained, 1 when any failed.

    With ``adapters`` (or an ``adapters:`` list in the recipe) every model is trained once per
    adapter method, e.g. ``lora,dora,adalora``, and the report has one row per model and method.
    With ``nproc`` every model trains in that many processes (``famtune train --nproc N``).
    """
    from famtune.report import write_report

    t0 = time.perf_counter()
    shared, specs, work = read_comparison(str(recipe_path or DEMO_RECIPE), models, overrides or {}, output)
    methods = adapter_methods(str(recipe_path or DEMO_RECIPE), adapters, shared)
    work.mkdir(parents=True, exist_ok=True)
    taken: set[str] = {"report", "tiny-bases"}
    runs = []
    for spec in specs:
        family = spec[len(TINY_PREFIX) :] if spec.startswith(TINY_PREFIX) else None
        for method in methods or [""]:
            name = run_name(f"{spec}-{method}" if method else spec, taken)
            runs.append(ModelRun(spec=spec, name=name, out=work / name, family=family, adapter=method))
    log(
        f"compare: {len(runs)} runs ({', '.join(r.spec + (f' [{r.adapter}]' if r.adapter else '') for r in runs)}) "
        f"in {work}"
    )
    Runner(shared, runs, work, log, train_args=["--nproc", str(nproc)] if nproc else None).run_all()
    report_dir = write_report(work, shared, specs, runs)
    failed = [r for r in runs if r.status == "failed"]
    earlier = sum(r.status == "skipped" for r in runs)
    log(
        f"compare: {len(runs) - len(failed)}/{len(runs)} models trained"
        + (f" ({earlier} by an earlier run)" if earlier else "")
        + f" in {time.perf_counter() - t0:.0f}s; report: {report_dir / 'report.html'}"
    )
    return 1 if failed else 0
