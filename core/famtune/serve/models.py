"""The models one ``famtune serve`` process answers for: a base (or merged) checkpoint and any
number of adapters trained on it, sharing one copy of the base weights.

Each served name is a :class:`famtune.chat.ChatSession` with its own stop ids, sampling defaults
and system prompt from its ``famtune.json``; requests select one by the OpenAI ``model`` field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from famtune.chat import ChatSession, load_base, profile
from famtune.errors import FamtuneError
from famtune.metadata import read_metadata


@dataclass
class ServedModel:
    name: str
    session: ChatSession
    source: str  # the directory it was loaded from
    kind: str  # "base" or "adapter"


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """``NAME=DIR`` (or a bare ``DIR``, named after its last path part) to an ordered {name: dir}."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise FamtuneError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in adapters:
            raise FamtuneError(f"--adapter {spec!r}: the name {name!r} is given twice; name each adapter differently")
        adapters[name] = path
    return adapters


def load_served(
    model: str, adapters: dict[str, str] | None = None, *, base_name: str | None = None, trust_remote_code: bool = False
) -> dict[str, ServedModel]:
    """Load ``model`` once and attach every adapter of ``adapters`` ({name: dir}) to it.

    When ``model`` is itself an adapter directory, its recorded base is loaded and the adapter is
    served under the directory's name."""
    adapters = dict(adapters or {})
    if Path(model, "adapter_config.json").is_file():
        meta = read_metadata(model) or {}
        adapters = {Path(os.path.abspath(model)).name: model, **adapters}
        model = meta.get("base_path") or meta["base_model"]
    metas: dict[str, dict] = {}
    for name, path in adapters.items():
        if not Path(path, "adapter_config.json").is_file():
            raise FamtuneError(
                f"--adapter {name}={path}: no adapter_config.json there; pass an adapter "
                "directory written by famtune train"
            )
        metas[name] = read_metadata(path) or {}
    ckpt, own, loaded = load_base(model, list(metas.values()), trust_remote_code=trust_remote_code)
    tokenizer = ckpt.load_tokenizer()
    base_name = base_name or (Path(os.path.abspath(model)).name if os.path.isdir(model) else model)
    if base_name in adapters:
        raise FamtuneError(f"the base is called {base_name!r} like an adapter; rename the adapter (--adapter NAME=DIR)")
    if adapters:
        from peft import PeftModel

        # peft keeps adapters in module dicts, whose keys cannot hold every name a user may choose.
        for i, path in enumerate(adapters.values()):
            if i == 0:
                loaded = PeftModel.from_pretrained(loaded, path, adapter_name=f"a{i}")
            else:
                loaded.load_adapter(path, adapter_name=f"a{i}")
        loaded.eval()
    served = {}
    stop_ids, sampling, system = profile(own, ckpt.family, tokenizer)
    served[base_name] = ServedModel(
        base_name, ChatSession(loaded, tokenizer, ckpt.family, stop_ids, sampling, system), str(model), "base"
    )
    for i, (name, path) in enumerate(adapters.items()):
        stop_ids, sampling, system = profile(metas[name], ckpt.family, tokenizer)
        session = ChatSession(loaded, tokenizer, ckpt.family, stop_ids, sampling, system, adapter=f"a{i}")
        served[name] = ServedModel(name, session, str(path), "adapter")
    return served


def is_comparison(directory: str) -> bool:
    """Whether ``directory`` is a ``famtune compare`` output (it holds report/results.json)."""
    return Path(directory, "report", "results.json").is_file()


def load_comparison(directory: str, *, trust_remote_code: bool = False) -> dict[str, ServedModel]:
    """Every finished run of a ``famtune compare`` output: each run's adapter under the run's name
    and its base as ``NAME/base``, so the chat page can put two families side by side."""
    import json

    results = Path(directory, "report", "results.json")
    try:
        runs = json.loads(results.read_text(encoding="utf-8"))["models"]
    except (OSError, ValueError, KeyError) as exc:
        raise FamtuneError(f"{results}: not a readable comparison result ({exc}); re-run famtune compare") from None
    served: dict[str, ServedModel] = {}
    for run in runs:
        run_dir = Path(run.get("dir") or Path(directory, run["name"]))
        if run.get("status") != "ok" or not Path(run_dir, "adapter_config.json").is_file():
            continue
        served.update(load_served(str(run_dir), base_name=f"{run['name']}/base", trust_remote_code=trust_remote_code))
    if not served:
        raise FamtuneError(
            f"{directory}: no finished run with an adapter in this comparison; run famtune compare first"
        )
    return served
