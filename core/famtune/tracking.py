"""What a run reports while it runs: experiment trackers and the plain progress line.

Trackers (recipe ``report_to: [tensorboard, wandb, mlflow, trackio, ...]``) are accelerate's:
famtune passes the names to ``Accelerator(log_with=...)``, so only the main process logs, and
gives the resolved recipe as the run's config. TensorBoard writes under
``OUTPUT/runs/<run name>/``; the others go where their own settings say (``WANDB_PROJECT``,
``MLFLOW_TRACKING_URI``, ...).

When the output is not a terminal (a log file, CI, ``famtune compare``'s per-model log), or the
recipe says ``progress: false``, a plain line is printed every ``logging_steps`` instead of a
progress bar, whose carriage returns would make a log one endless line.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any

from famtune.errors import FamtuneError

# Tracker name -> the module that must be importable for accelerate to offer it.
TRACKER_MODULES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}
TENSORBOARD_DIR = "runs"


def check_trackers(names: list[str], where: str = "recipe") -> list[str]:
    """The recipe's tracker names, each known and installed; otherwise a one-line error saying what to do."""
    out = []
    for name in names:
        key = str(name).strip().lower()
        if key in ("", "none"):
            continue
        if key not in TRACKER_MODULES:
            raise FamtuneError(f"{where}: report_to names {name!r}; known trackers: {', '.join(TRACKER_MODULES)}")
        if importlib.util.find_spec(TRACKER_MODULES[key]) is None:
            raise FamtuneError(
                f"{where}: report_to names {key}, which is not installed; pip install {key} "
                f"(or remove it from report_to)"
            )
        out.append(key)
    return out


def accelerator_kwargs(report_to: list[str], output_dir: str) -> dict[str, Any]:
    """Keyword arguments for ``accelerate.Accelerator`` that enable the recipe's trackers."""
    trackers = check_trackers(report_to)
    if not trackers:
        return {}
    return {"log_with": trackers, "project_dir": output_dir}


def tracker_config(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe as a flat config every tracker accepts (TensorBoard's hparams take only scalars)."""
    out = {}
    for key, value in recipe.items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value, ensure_ascii=False)
    return out


class RunTracker:
    """The trackers of one run, through its accelerator (which logs on the main process only)."""

    def __init__(self, accelerator, recipe, run_name: str) -> None:
        self.accelerator = accelerator
        self.active = bool(check_trackers(recipe.report_to))
        if self.active:
            kwargs: dict[str, Any] = {"tensorboard": {}} if "tensorboard" in recipe.report_to else {}
            accelerator.init_trackers(run_name, config=tracker_config(recipe.to_dict()), init_kwargs=kwargs)

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.active:
            self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        if self.active:
            self.accelerator.end_training()
            self.active = False


def progress_bar_wanted(progress: bool, stream=None) -> bool:
    """A tqdm bar only on an interactive terminal; plain lines everywhere else."""
    stream = stream or sys.stderr
    return bool(progress) and bool(getattr(stream, "isatty", lambda: False)())


def progress_line(step: int, total: int, loss: float, lr: float, tokens_per_s: float, elapsed: float) -> str:
    """One log line per logging step, with an ETA from the mean step time so far."""
    eta = elapsed / step * (total - step) if step else 0.0
    return (
        f"step {step}/{total} loss {loss:.4f} lr {lr:.2e} tokens/s {tokens_per_s:,.0f} "
        f"elapsed {_clock(elapsed)} eta {_clock(eta)}"
    )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
