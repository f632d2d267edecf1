"""A model for lm-evaluation-harness that asks in the family's chat format.

lm-eval's own ``hf`` model scores chat models on raw text unless ``--apply_chat_template`` is
given, and then with the tokenizer's template, which for remote-code families is missing or
differs from the one the model was tuned with. ``famtune`` loads the model the way ``famtune
chat`` does (NF4 base + adapter, or a merged directory) and renders every request with the family
plugin's ``encode``: the request's context is the user turn, the continuation the assistant reply.

lm-eval 0.4 finds models only in its registry, not through entry points, so this module registers
``famtune`` on import; ``python -m famtune.evaluate.harness ARGS`` is lm-eval's command line with
it registered:

    python -m famtune.evaluate.harness run --model famtune \\
        --model_args pretrained=BASE,adapter=OUT --tasks TASK [--include_path DIR]
"""

from __future__ import annotations

import sys
from typing import Any

from famtune.errors import FamtuneError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:
    raise FamtuneError(f"lm-evaluation-harness is not installed ({exc}); pip install 'famtune[lm-eval]'") from None

from famtune.evaluate.scoring import EvalSettings, Scorer, ScoringModel, inference


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("famtune")
class FamtuneLM(LM):
    def __init__(
        self,
        pretrained: str,
        adapter: str | None = None,
        batch_size: Any = 8,
        system: str | None = None,
        trust_remote_code: Any = False,
        max_gen_toks: Any = 256,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        from famtune.chat import load_chat_model

        session = load_chat_model(
            str(pretrained), str(adapter) if adapter else None, trust_remote_code=_flag(trust_remote_code)
        )
        if system is not None:
            session.system = system
        self.sm = ScoringModel.from_session(session)
        size = int(batch_size) if str(batch_size).isdigit() else 8  # lm-eval may pass "auto"
        self.settings = EvalSettings(batch_size=size, max_new_tokens=int(max_gen_toks), progress=False)
        self._device = self.sm.device

    @property
    def tokenizer_name(self) -> str:
        return f"famtune-{self.sm.family.name}"

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        scorer = Scorer(self.sm, self.settings)
        # A continuation is the start of the assistant's reply; replies carry no leading space
        # (lm-eval's target delimiter), and the end-of-turn is not part of what is scored.
        rows = [
            scorer.reply_tokens(context, None, continuation.lstrip(), end_of_turn=False)
            for context, continuation in (r.args for r in requests)
        ]
        with inference(self.sm.model):
            return scorer.sequence_scores(rows)

    def loglikelihood_rolling(self, requests) -> list[float]:
        raise NotImplementedError("famtune scores chat turns; perplexity tasks on raw text need lm-eval's hf model")

    def generate_until(self, requests) -> list[str]:
        scorer = Scorer(self.sm, self.settings)
        out = []
        with inference(self.sm.model):
            for req in requests:
                context, kwargs = req.args
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                scorer.settings = EvalSettings(
                    batch_size=1,
                    progress=False,
                    max_new_tokens=int(kwargs.get("max_gen_toks", self.settings.max_new_tokens)),
                )
                text = scorer.generate([scorer.prompt_ids(context, None)])[0]
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from famtune.cli import _quiet_libraries

    _quiet_libraries()
    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]  # lm-eval parses sys.argv itself
    try:
        cli_evaluate()
    except FamtuneError as exc:  # a bad model path or adapter: one line, as famtune's own commands print
        print(f"famtune: error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
