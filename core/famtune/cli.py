"""The ``famtune`` command. Heavy libraries are imported inside each command, so ``--help`` is fast."""

from __future__ import annotations

import argparse
import json
import os
import sys

from famtune import __version__
from famtune.errors import FamtuneError


def _cmd_train(args, extra: list[str]) -> int:
    from famtune import api, distributed, launch
    from famtune.recipe import parse_overrides

    if args.resume and args.overwrite:
        raise FamtuneError("--resume continues a run and --overwrite replaces it; give one of them")
    recipe = api.make_recipe(args.recipe, **parse_overrides(extra))
    opts = launch.LaunchOptions.from_args(args)
    if opts is not None:  # several processes: this one becomes torchrun's agent
        return launch.launch(opts, launch.worker_args(args, extra), recipe.output_dir)
    api.fine_tune(
        recipe, resume=distributed.resume_after_restart(args.resume, recipe.output_dir), overwrite=args.overwrite
    )
    return 0


def _cmd_merge(args, extra: list[str]) -> int:
    from famtune.api import merge_adapter

    merge_adapter(
        args.adapter_dir,
        args.out,
        max_shard_size=args.max_shard_size,
        base=args.base,
        base_precision=args.base_precision,
        layout=args.layout,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    return 0


def _cmd_chat(args, extra: list[str]) -> int:
    from famtune.chat import load_chat_model, run_chat

    session = load_chat_model(args.model, args.adapter, trust_remote_code=args.trust_remote_code)
    return run_chat(
        session, prompt=args.prompt, system=args.system, greedy=args.greedy, max_new_tokens=args.max_new_tokens
    )


def _cmd_serve(args, extra: list[str]) -> int:
    from famtune.serve import serve

    api_key = args.api_key or os.environ.get("FAMTUNE_API_KEY") or None
    return serve(
        args.model,
        args.adapter,
        host=args.host,
        port=args.port,
        api_key=api_key,
        name=args.name,
        trust_remote_code=args.trust_remote_code,
    )


def _cmd_plugins(args, extra: list[str]) -> int:
    from famtune.plugins import get_plugins

    plugins = get_plugins()
    rows = [
        {
            "name": n,
            "distribution": i.distribution,
            "version": i.version,
            "families": plugins.families_of(n),
            "hooks": plugins.hooks_of(n),
            **plugins.extensions_of(n),
        }
        for n, i in plugins.infos.items()
    ]
    broken = [
        {"name": b.info.name, "distribution": b.info.distribution, "version": b.info.version, "error": b.error}
        for b in plugins.broken
    ]
    if args.json:
        print(json.dumps({"plugins": rows, "broken": broken}, indent=2))
        return 0
    if not rows:
        print(
            "no famtune plugins loaded"
            + (" (FAMTUNE_LOAD_PLUGINS is set)" if "FAMTUNE_LOAD_PLUGINS" in os.environ else "")
        )
    for r in rows:
        print(f"{r['name']} ({r['distribution']} {r['version']})")
        print(f"  families: {', '.join(r['families']) or '-'}")
        print(f"  hooks:    {', '.join(h.removeprefix('famtune_') for h in r['hooks'])}")
        for kind in ("masking_policies", "data_formats"):
            if r[kind]:
                print(f"  {kind.replace('_', ' ')}: {', '.join(r[kind])}")
    for b in broken:
        print(f"{b['name']} ({b['distribution']} {b['version']}): DISABLED: {b['error']}")
    return 0


def _cmd_plugins_check(args, extra: list[str]) -> int:
    import tempfile

    from famtune.testing.conformance import check_plugin

    def run(workdir: str):
        log = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
        return check_plugin(args.name, workdir, families=args.family or None, log=log)

    if args.workdir:
        report = run(args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="famtune-check-") as tmp:
            report = run(tmp)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.ok else 1


def _cmd_plugin_new(args, extra: list[str]) -> int:
    from famtune.scaffold import new_plugin

    out = new_plugin(args.name, args.dir)
    print(f"famtune: wrote plugin {args.name!r} to {out}; next: pip install -e {out} && pytest {out}")
    return 0


def _cmd_data_check(args, extra: list[str]) -> int:
    from famtune.datacheck import data_check

    return data_check(
        args.file,
        args.model,
        fmt=args.format,
        masking=args.masking,
        max_length=args.max_length,
        skip_bad_records=args.skip_bad_records,
        family=args.family,
        trust_remote_code=args.trust_remote_code,
    )


def _cmd_demo(args, extra: list[str]) -> int:
    from famtune.demo import run_demo

    return run_demo(args.workdir, family=args.family, steps=args.steps)


def _cmd_estimate(args, extra: list[str]) -> int:
    from famtune.estimate import estimate_recipe, parse_size
    from famtune.recipe import load_recipe, parse_overrides

    budget = parse_size(args.budget) if args.budget else None
    # The estimate reads no data, so a recipe without `data:` is fine here.
    recipe = load_recipe(args.recipe, {"data": "unused", **parse_overrides(extra)})
    est = estimate_recipe(recipe)
    if args.nproc:
        from famtune.estimate import per_device

        est = per_device(est, recipe.distributed, args.nproc)
    for line in est.lines(budget):
        print(line)
    return 0 if budget is None or est.total <= budget else 1


def _cmd_compare(args, extra: list[str]) -> int:
    from famtune.compare import compare
    from famtune.recipe import parse_overrides

    # The recipe is read from the extra arguments: a declared optional positional would swallow
    # the value of a `--key value` override that argparse does not know.
    recipe = extra.pop(0) if extra and not extra[0].startswith("--") else None
    if recipe and args.demo:
        raise FamtuneError(f"give a recipe ({recipe!r}) or --demo, not both")
    if not recipe and not args.demo:
        raise FamtuneError(
            "no recipe given; run `famtune compare RECIPE.yaml --models M1 M2 ...` or `famtune compare --demo`"
        )
    if args.nproc is not None and args.nproc < 1:
        raise FamtuneError(f"--nproc {args.nproc}: expected at least 1 process")
    code = compare(
        recipe,
        models=args.models,
        overrides=parse_overrides(extra),
        output=args.output,
        adapters=[args.adapters] if args.adapters else None,
        nproc=args.nproc,
    )
    if args.serve:  # try the trained models side by side in the chat page
        from famtune.compare import DEMO_RECIPE, read_comparison
        from famtune.serve import serve

        work = read_comparison(str(recipe or DEMO_RECIPE), args.models, parse_overrides(extra), args.output)[2]
        return serve(str(work), port=args.port)
    return code


def _cmd_recipes_list(args, extra: list[str]) -> int:
    from famtune.recipes import list_recipes

    recipes = list_recipes(args.pattern)
    if not recipes:
        print(
            f"no built-in recipe matches {args.pattern!r}"
            if args.pattern
            else "no built-in recipes (no plugin ships any)"
        )
        return 1 if args.pattern else 0
    width = max(len(r.name) for r in recipes)
    for r in recipes:
        print(f"{r.name:<{width}}  [{r.plugin}] {r.description}")
    return 0


def _cmd_recipes_copy(args, extra: list[str]) -> int:
    from famtune.recipes import copy_recipe

    out = copy_recipe(args.name, args.dest)
    print(f"famtune: wrote {out}; edit it, then: famtune train {out}")
    return 0


def _cmd_data_convert(args, extra: list[str]) -> int:
    from famtune.dataconvert import ColumnMap, convert_file

    columns = ColumnMap(question=args.question, answer=args.answer, system=args.system, history=args.history)
    report = convert_file(args.input, args.output, fmt=args.format, columns=columns, skip_bad_rows=args.skip_bad_rows)
    for line in report.lines():
        print(line)
    return 0


def _cmd_env(args, extra: list[str]) -> int:
    from famtune.envinfo import collect_env, env_lines

    info = collect_env()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for line in env_lines(info):
            print(line)
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action) or ""


class _RecipeKeysFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _recipe_keys_epilog() -> str:
    from famtune.recipe_help import recipe_keys_help
    from famtune.validate import aliases_help

    return (
        "recipe keys (any of them can be overridden with --key value):\n" + recipe_keys_help() + "\n" + aliases_help()
    )


def _cmd_eval(args, extra: list[str]) -> int:
    from famtune.evaluate.cli import run_eval_command

    return run_eval_command(args)


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes are one line, like every other famtune error; --help has the full usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (tokens, processes, steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; expected >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="famtune",
        description="QLoRA fine-tuning of chat LLMs; every model family is a plugin.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"famtune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(parent, name: str, **kwargs) -> argparse.ArgumentParser:
        return parent.add_parser(name, formatter_class=_HelpFormatter, **kwargs)

    t = command(
        sub,
        "train",
        help="fine-tune a model with a recipe",
        description="Train a LoRA/QLoRA adapter. Any recipe key can be overridden: --key value.",
        epilog=_recipe_keys_epilog(),
    )
    t.formatter_class = _RecipeKeysFormatter  # the epilog is a table: keep its line breaks
    t.add_argument("recipe", help="recipe YAML file (`famtune recipes list` shows built-in ones)")
    t.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the newest verified checkpoint in output_dir (or the given checkpoint dir)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in output_dir (its checkpoints, adapter and metrics) instead of refusing",
    )
    from famtune.launch import add_arguments as add_launch_arguments

    add_launch_arguments(t)
    t.set_defaults(func=_cmd_train, extra_ok=True)

    m = command(
        sub,
        "merge",
        help="merge an adapter into its base and save a full model",
        description="Merge a LoRA adapter into its base and write a full model (sharded safetensors, "
        "tokenizer with chat_template, generation_config, README.md model card).",
    )
    m.add_argument("adapter_dir", help="a famtune training output directory (adapter + famtune.json)")
    m.add_argument("out", help="directory to write the merged model to")
    m.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard")
    m.add_argument("--base", help="base checkpoint (default: the one recorded in the adapter)")
    m.add_argument(
        "--base-precision",
        choices=["trained", "original"],
        default="trained",
        help="trained: merge into the dequantized NF4 base the adapter was trained against; "
        "original: into the full-precision weights",
    )
    m.add_argument(
        "--layout",
        choices=["native", "original"],
        default="native",
        help="native transformers layout, or the family's original layout",
    )
    m.add_argument("--dtype", help="output dtype, e.g. bf16 (default: the base's)")
    m.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code to run")
    m.set_defaults(func=_cmd_merge)

    c = command(sub, "chat", help="chat with a model (optionally with an adapter)")
    c.add_argument("model", help="model directory, Org/Name or modelscope:Org/Name (a merged model works too)")
    c.add_argument("--adapter", help="a famtune training output directory to apply on top of MODEL")
    c.add_argument("--prompt", help="answer this once and exit")
    c.add_argument("--system", help="system prompt (default: the family's)")
    c.add_argument("--greedy", action="store_true", help="greedy decoding instead of the family's sampling")
    c.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest reply, in tokens")
    c.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code to run")
    c.set_defaults(func=_cmd_chat)

    sv = command(
        sub,
        "serve",
        help="serve models over an OpenAI-compatible API with a chat page",
        description="Answer OpenAI-style requests (/v1/models, /v1/chat/completions, /v1/completions) "
        "and serve a chat page at /. The request's `model` picks the base or one of the "
        "adapters, which share one copy of the base weights.",
    )
    sv.add_argument(
        "model",
        help="base or merged model directory, an adapter directory (its base is loaded), "
        "or a famtune compare output (every run beside its base)",
    )
    sv.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=DIR",
        help="serve this adapter of MODEL as NAME (repeatable; a bare DIR is named after its folder)",
    )
    sv.add_argument("--name", help="the model name of MODEL itself (default: its folder name)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on; 127.0.0.1 is this machine only")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on")
    sv.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $FAMTUNE_API_KEY, else no key)"
    )
    sv.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code to run")
    sv.set_defaults(func=_cmd_serve)

    pl = command(sub, "plugins", help="list installed family plugins")
    pl.add_argument("--json", action="store_true", help="print JSON instead of text")
    pl.set_defaults(func=_cmd_plugins)
    plsub = pl.add_subparsers(dest="plugins_command", metavar="SUBCOMMAND")
    pc = command(
        plsub,
        "check",
        help="run the conformance suite on an installed plugin's tiny models",
        description="Build a tiny model of each family the plugin provides and check its "
        "template, labels, stop ids, LoRA targets, a QLoRA step, the merge and packing.",
    )
    pc.add_argument("name", help="the plugin's entry-point name, as `famtune plugins` lists it")
    pc.add_argument("--family", action="append", help="check only this family (repeatable; default: all)")
    pc.add_argument("--workdir", help="keep the tiny models, adapters and merged models here (default: a temp dir)")
    pc.add_argument("--json", action="store_true", help="print JSON instead of text")
    pc.set_defaults(func=_cmd_plugins_check)

    pn = command(sub, "plugin", help="write a new family plugin package")
    pnsub = pn.add_subparsers(dest="plugin_command", metavar="SUBCOMMAND")
    pnew = command(
        pnsub,
        "new",
        help="write a ready-to-install family plugin package",
        description="Write famtune-NAME: pyproject.toml with the famtune entry point, every "
        "hook implemented for a ChatML-style native Llama model, and tests.",
    )
    pnew.add_argument("name", help="family and plugin name, e.g. acme")
    pnew.add_argument("--dir", help="parent directory (default: the current one); writes DIR/famtune-NAME")
    pnew.set_defaults(func=_cmd_plugin_new)

    d = command(sub, "data", help="dataset tools: check, convert")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dc = command(dsub, "check", help="validate a data file and show one encoded sample")
    dc.add_argument("file", help="JSON or JSONL data file")
    dc.add_argument("--model", required=True, help="model whose family plugin and tokenizer encode the data")
    dc.add_argument("--format", default="auto", help="data format: auto, conversation, messages, alpaca or sharegpt")
    dc.add_argument("--masking", help="masking policy (default: the family's first)")
    dc.add_argument("--family", help="force a family instead of the plugin's claim")
    dc.add_argument("--max-length", type=positive_int, default=1024, help="truncate samples to this many tokens")
    dc.add_argument(
        "--skip-bad-records", action="store_true", help="skip and report malformed records instead of stopping"
    )
    dc.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code to run")
    dc.set_defaults(func=_cmd_data_check)
    dv = command(
        dsub,
        "convert",
        help="convert a spreadsheet or data file into famtune JSONL",
        description="Convert .xlsx, .csv, .tsv, .parquet, or JSON/JSONL in any format famtune reads, into "
        "JSONL in the messages or conversation format. Spreadsheets need famtune[data] "
        "(pandas, openpyxl, pyarrow). Columns are matched by header name.",
    )
    dv.add_argument("input", help="the file to convert (.xlsx, .csv, .tsv, .parquet, .json, .jsonl)")
    dv.add_argument("output", help="the JSONL file to write")
    dv.add_argument("--format", choices=["messages", "conversation"], default="messages", help="output format")
    dv.add_argument(
        "--question", help="column with the user's question (default: question, or input/instruction/prompt)"
    )
    dv.add_argument("--answer", help="column with the answer (default: answer, or output/response)")
    dv.add_argument("--system", help="column with a system prompt, or a literal system prompt for every row")
    dv.add_argument("--history", help="column of earlier turns, as a JSON list of [question, answer] pairs")
    dv.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="skip and report rows with an empty question/answer instead of stopping",
    )
    dv.set_defaults(func=_cmd_data_convert)

    rc = command(sub, "recipes", help="built-in recipes: list, copy")
    rsub = rc.add_subparsers(dest="recipes_command", metavar="SUBCOMMAND")
    rl = command(rsub, "list", help="list the built-in recipes the installed plugins ship")
    rl.add_argument("pattern", nargs="?", help="only names containing this text (or matching this glob)")
    rl.set_defaults(func=_cmd_recipes_list)
    ry = command(rsub, "copy", help="copy a built-in recipe (and its bundled data) to edit it")
    ry.add_argument("name", help="recipe name, as `famtune recipes list` shows it")
    ry.add_argument("dest", nargs="?", help="a .yaml file or a directory (default: the current directory)")
    ry.set_defaults(func=_cmd_recipes_copy)

    cp = command(
        sub,
        "compare",
        help="train several models on one recipe and report them side by side",
        usage="famtune compare (RECIPE.yaml | --demo) [--models M1 M2 ...] [--output DIR] [--key value ...]",
        description="Train every model with the same recipe, each through its own family plugin "
        "and in its own process, then write OUTPUT/report/ (report.md, report.html, "
        "results.json). A re-run skips finished models. Any recipe key can be "
        "overridden: --key value. tiny:FAMILY builds a tiny local model of FAMILY.",
    )
    cp.add_argument("--models", nargs="+", metavar="MODEL", help="models to compare (instead of the recipe's list)")
    cp.add_argument("--output", help="comparison directory (default: the recipe's output_dir, else famtune-compare)")
    cp.add_argument(
        "--nproc", type=positive_int, metavar="N", help="train each model in N processes (famtune train --nproc N)"
    )
    cp.add_argument(
        "--adapters",
        metavar="M1,M2",
        help="compare adapter methods too: every model once per method, "
        "e.g. lora,dora,adalora or lora+pissa (docs/users/adapters.md)",
    )
    cp.add_argument(
        "--demo",
        action="store_true",
        help="the built-in comparison of the four families on tiny local models (nothing downloaded)",
    )
    cp.add_argument(
        "--serve",
        action="store_true",
        help="afterwards, serve every trained model (famtune serve OUTPUT) to try them in the chat page",
    )
    cp.add_argument("--port", type=int, default=8000, help="port for --serve")
    cp.set_defaults(func=_cmd_compare, extra_ok=True)

    es = command(
        sub,
        "estimate",
        help="predict the peak accelerator memory of a recipe's run",
        description="Predict peak accelerator memory (weights, LoRA, optimizer state, activations) "
        "from the model's config; nothing is loaded or trained. Any recipe key can be "
        "overridden: --key value. Exit status 1 when the run does not fit --budget.",
    )
    es.add_argument("recipe", help="recipe YAML file")
    es.add_argument("--budget", help="memory to fit in, e.g. 8GB")
    es.add_argument(
        "--nproc", type=positive_int, help="processes the run is split over (with the recipe's distributed preset)"
    )
    es.set_defaults(func=_cmd_estimate, extra_ok=True)

    from famtune.evaluate.cli import add_eval_parser

    add_eval_parser(sub, formatter_class=_HelpFormatter).set_defaults(func=_cmd_eval)

    de = command(sub, "demo", help="build a tiny model, fine-tune it on a self-identity set, merge and chat")
    de.add_argument("--workdir", default="famtune-demo", help="where the tiny model, adapter and merged model go")
    de.add_argument("--family", help="family of the tiny model (default: the bundled demo recipe's)")
    de.add_argument("--steps", type=positive_int, help="optimizer steps (default: the demo recipe's)")
    de.set_defaults(func=_cmd_demo)

    ev = command(
        sub,
        "env",
        help="print versions, device and known-bad combinations (for bug reports)",
        description="Print the versions of famtune, its plugins and the libraries it trains with, "
        "the device and the bitsandbytes backend, and warn about known-bad combinations.",
    )
    ev.add_argument("--json", action="store_true", help="print JSON instead of text")
    ev.set_defaults(func=_cmd_env)
    _add_plugin_commands(sub)
    return p


def _add_plugin_commands(sub) -> None:
    """Plugins' own subcommands (famtune_register_commands); a failing plugin costs only its commands."""
    from famtune.plugins import get_plugins

    try:
        get_plugins().add_commands(sub)
    except FamtuneError:
        pass  # a plugin set that cannot load is reported by the command that needs it
    except Exception as exc:
        print(
            f"famtune: warning: a plugin's famtune_register_commands raised {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )


def _quiet_libraries() -> None:
    """Keep the terminal for famtune's own progress: no per-file loading bars, no renaming notices."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings(
        "ignore", message=r".*(gradient_checkpointing|is_gradient_checkpointing).*deprecated", category=FutureWarning
    )
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
    except Exception as exc:  # no traceback reaches a user unless they ask for it
        if os.environ.get("FAMTUNE_DEBUG") == "1":
            raise
        from famtune.durable import is_disk_full

        if is_disk_full(exc):
            print(
                f"famtune: error: disk full ({str(exc).splitlines()[0][:200]}); free space and run again "
                "(training continues with --resume)",
                file=sys.stderr,
            )
            return 2
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(
            f"famtune: error: unexpected {type(exc).__name__}: {first} (FAMTUNE_DEBUG=1 shows the traceback; "
            "please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
