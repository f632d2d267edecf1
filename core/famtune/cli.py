"""The ``famtune`` command. Heavy libraries are imported inside each command, so ``--help`` is fast."""
from __future__ import annotations

import argparse
import json
import os
import sys

from famtune import __version__
from famtune.errors import FamtuneError


def _cmd_train(args, extra: list[str]) -> int:
    from famtune.recipe import load_recipe, parse_overrides
    from famtune.train import train

    recipe = load_recipe(args.recipe, parse_overrides(extra))
    train(recipe, resume=args.resume)
    return 0


def _cmd_merge(args, extra: list[str]) -> int:
    from famtune.merge import merge

    merge(args.adapter_dir, args.out, max_shard_size=args.max_shard_size, base=args.base,
          base_precision=args.base_precision, layout=args.layout, dtype=args.dtype,
          trust_remote_code=args.trust_remote_code)
    return 0


def _cmd_chat(args, extra: list[str]) -> int:
    from famtune.chat import load_chat_model, run_chat

    session = load_chat_model(args.model, args.adapter, trust_remote_code=args.trust_remote_code)
    return run_chat(session, prompt=args.prompt, system=args.system, greedy=args.greedy,
                    max_new_tokens=args.max_new_tokens)


def _cmd_plugins(args, extra: list[str]) -> int:
    from famtune.plugins import get_plugins

    plugins = get_plugins()
    rows = [{"name": n, "distribution": i.distribution, "version": i.version,
             "families": plugins.families_of(n), "hooks": plugins.hooks_of(n)} for n, i in plugins.infos.items()]
    broken = [{"name": b.info.name, "distribution": b.info.distribution, "version": b.info.version,
               "error": b.error} for b in plugins.broken]
    if args.json:
        print(json.dumps({"plugins": rows, "broken": broken}, indent=2))
        return 0
    if not rows:
        print("no famtune plugins loaded" + (" (FAMTUNE_LOAD_PLUGINS is set)" if "FAMTUNE_LOAD_PLUGINS" in os.environ else ""))
    for r in rows:
        print(f"{r['name']} ({r['distribution']} {r['version']})")
        print(f"  families: {', '.join(r['families']) or '-'}")
        print(f"  hooks:    {', '.join(h.removeprefix('famtune_') for h in r['hooks'])}")
    for b in broken:
        print(f"{b['name']} ({b['distribution']} {b['version']}): DISABLED: {b['error']}")
    return 0


def _cmd_data_check(args, extra: list[str]) -> int:
    from famtune.datacheck import data_check

    return data_check(args.file, args.model, fmt=args.format, masking=args.masking, max_length=args.max_length,
                      skip_bad_records=args.skip_bad_records, family=args.family,
                      trust_remote_code=args.trust_remote_code)


def _cmd_demo(args, extra: list[str]) -> int:
    from famtune.demo import run_demo

    return run_demo(args.workdir, family=args.family, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="famtune",
        description="QLoRA fine-tuning of chat LLMs; every model family is a plugin.",
    )
    p.add_argument("--version", action="version", version=f"famtune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model with a recipe",
                       description="Train a LoRA/QLoRA adapter. Any recipe key can be overridden: --key value.")
    t.add_argument("recipe", help="recipe YAML file")
    t.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint in output_dir (or the given checkpoint dir)")
    t.set_defaults(func=_cmd_train, extra_ok=True)

    m = sub.add_parser("merge", help="merge an adapter into its base and save a full model")
    m.add_argument("adapter_dir")
    m.add_argument("out")
    m.add_argument("--max-shard-size", default="2GB")
    m.add_argument("--base", help="base checkpoint (default: the one recorded in the adapter)")
    m.add_argument("--base-precision", choices=["trained", "original"], default="trained",
                   help="trained: merge into the dequantized NF4 base the adapter was trained against (default); "
                        "original: into the full-precision weights")
    m.add_argument("--layout", choices=["native", "original"], default="native",
                   help="native transformers layout, or the family's original layout")
    m.add_argument("--dtype", help="output dtype (default: the base's)")
    m.add_argument("--trust-remote-code", action="store_true")
    m.set_defaults(func=_cmd_merge)

    c = sub.add_parser("chat", help="chat with a model (optionally with an adapter)")
    c.add_argument("model")
    c.add_argument("--adapter")
    c.add_argument("--prompt", help="answer this once and exit")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--greedy", action="store_true", help="greedy decoding instead of the family's sampling")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--trust-remote-code", action="store_true")
    c.set_defaults(func=_cmd_chat)

    pl = sub.add_parser("plugins", help="list installed family plugins")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_cmd_plugins)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dc = dsub.add_parser("check", help="validate a data file and show one encoded sample")
    dc.add_argument("file")
    dc.add_argument("--model", required=True)
    dc.add_argument("--format", default="auto")
    dc.add_argument("--masking")
    dc.add_argument("--family")
    dc.add_argument("--max-length", type=int, default=1024)
    dc.add_argument("--skip-bad-records", action="store_true")
    dc.add_argument("--trust-remote-code", action="store_true")
    dc.set_defaults(func=_cmd_data_check)

    de = sub.add_parser("demo", help="build a tiny model, fine-tune it on a self-identity set, merge and chat")
    de.add_argument("--workdir", default="famtune-demo")
    de.add_argument("--family", help="family of the tiny model (default: the bundled demo recipe's)")
    de.add_argument("--steps", type=int, help="optimizer steps (default: the demo recipe's)")
    de.set_defaults(func=_cmd_demo)
    return p


def _quiet_libraries() -> None:
    """Keep the terminal for famtune's own progress: no per-file loading bars, no renaming notices."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", message=r".*(gradient_checkpointing|is_gradient_checkpointing).*deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch.jit.script_method.*", category=DeprecationWarning)
    import logging

    # bitsandbytes offers to fetch a CPU kernel from the hub; famtune never downloads code, so the
    # offer's failure is expected and not worth a warning.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    if extra and not getattr(args, "extra_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    try:
        return args.func(args, extra)
    except FamtuneError as exc:
        print(f"famtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("famtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
