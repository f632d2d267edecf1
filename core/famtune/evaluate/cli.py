"""The ``famtune eval`` command line: arguments and what they run (kept out of the shared cli.py)."""

from __future__ import annotations

import argparse

from famtune.errors import FamtuneError


def add_eval_parser(sub, **parser_kwargs) -> argparse.ArgumentParser:
    ev = sub.add_parser(
        "eval",
        **parser_kwargs,
        help="score a model (or base + adapter) on multiple-choice or open QA questions",
        usage="famtune eval MODEL [--adapter DIR] --data FILE [--task mcq|qa] [options] | famtune eval --demo",
        description="Load MODEL as `famtune chat` does (NF4 base + --adapter, or a merged directory), ask every "
        "question in the family's chat format and write OUTPUT/eval.json and OUTPUT/eval.md. "
        "mcq: accuracy by option log-likelihood and by greedy answer, with 95% intervals; "
        "qa: exact match, BLEU and ROUGE-L. --demo fine-tunes a tiny model on a bundled MCQ set "
        "and shows its accuracy before and after.",
    )
    ev.add_argument("model", nargs="?", help="base or merged model directory (or Org/Name, modelscope:Org/Name)")
    ev.add_argument("--adapter", help="adapter directory written by famtune train")
    ev.add_argument("--data", help="eval file: JSONL or JSON array (layouts in docs/users/eval.md)")
    ev.add_argument(
        "--task",
        choices=["mcq", "qa"],
        default="mcq",
        help="mcq: lettered options, scored by log-likelihood and by greedy answer; qa: open answers",
    )
    ev.add_argument("--output", help="directory for eval.json and eval.md (default: ADAPTER/eval, else famtune-eval)")
    ev.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="option sequences (log-likelihood) or prompts (generation) per forward pass",
    )
    ev.add_argument(
        "--max-new-tokens", type=int, default=None, help="longest generated answer (default: 16 for mcq, 128 for qa)"
    )
    ev.add_argument(
        "--choice-format",
        default="{letter}",
        help="the assistant reply scored for each option, from {letter} and {text}",
    )
    ev.add_argument("--limit", type=int, default=0, help="score only the first N questions")
    ev.add_argument("--seed", type=int, default=0, help="torch seed (decoding is greedy)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code to run")
    ev.add_argument("--demo", action="store_true", help="the bundled before/after demo on a tiny model (offline)")
    ev.add_argument("--workdir", default="famtune-eval-demo", help="with --demo: where its models and reports go")
    ev.add_argument("--family", help="with --demo: family of the tiny model (default: the one the demo recipe names)")
    ev.add_argument("--steps", type=int, help="with --demo: optimizer steps of the fine-tune")
    return ev


def run_eval_command(args) -> int:
    from famtune.evaluate.scoring import EvalSettings

    if args.demo:
        if args.model or args.data:
            raise FamtuneError("give MODEL and --data, or --demo, not both")
        from famtune.evaluate.demo import run_eval_demo

        return run_eval_demo(args.workdir, family=args.family, steps=args.steps)
    if not args.model or not args.data:
        raise FamtuneError(
            "usage: famtune eval MODEL [--adapter DIR] --data FILE [--task mcq|qa]; or famtune eval --demo"
        )
    if "{letter}" not in args.choice_format and "{text}" not in args.choice_format:
        raise FamtuneError(f"--choice-format {args.choice_format!r} uses neither {{letter}} nor {{text}}")
    settings = EvalSettings(
        batch_size=args.batch_size,
        choice_format=args.choice_format,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens or (16 if args.task == "mcq" else 128),
        progress=not args.no_progress,
    )
    from famtune.evaluate.runner import run_eval

    run_eval(
        args.model,
        args.data,
        args.task,
        adapter=args.adapter,
        output=args.output,
        settings=settings,
        limit=args.limit,
        trust_remote_code=args.trust_remote_code,
    )
    return 0
