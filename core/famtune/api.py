"""famtune's Python API: what a script or notebook may use, re-exported as ``famtune.<name>``.

Everything named in ``__all__`` is stable: it keeps its name, arguments and behaviour within a major
version, and a change is announced with a ``DeprecationWarning`` for at least one minor release
first (docs/users/python-api.md). Every other module is internal and may change in any release.

The command line goes through these same functions (``famtune train`` through ``make_recipe`` and
``fine_tune``, ``famtune merge`` through ``merge_adapter``), so a script and the CLI do the same
thing. The names differ from famtune's modules (``famtune.train`` is a module, so the function is
``fine_tune``): importing a module would otherwise replace the function on the package.
Heavy libraries (torch, transformers, peft) load on the first call, never on ``import famtune``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from famtune.errors import FamtuneError

if TYPE_CHECKING:
    from famtune.checkpoint import Checkpoint
    from famtune.encoding import EncodedConversation
    from famtune.recipe import Recipe
    from famtune.session import Chat

__all__ = [
    "Model",
    "open_model",
    "tiny_model",
    "load_chat",
    "generate",
    "make_recipe",
    "fine_tune",
    "merge_adapter",
]


class Model:
    """A checkpoint with the family that claimed it: its tokenizer, chat format and weights.

    Opening is cheap (the config is read and the family claims it); ``tokenizer`` loads on first
    use and ``load()`` reads the weights.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self._checkpoint = checkpoint

    def __repr__(self) -> str:
        return f"<famtune.Model {self.family} at {self.path}>"

    @property
    def path(self) -> str:
        """The checkpoint's local directory (a hub id is resolved to its download)."""
        return self._checkpoint.path

    @property
    def family(self) -> str:
        """The name of the family that claimed the checkpoint, e.g. ``"qwen2.5"``."""
        return self._checkpoint.family.name

    @property
    def masking_policies(self) -> list[str]:
        """The masking policies ``encode`` accepts for this family; the first is its default."""
        return self._checkpoint.family.masking_policies()

    @cached_property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer, as the family loads it (a ``transformers`` tokenizer)."""
        return self._checkpoint.load_tokenizer()

    def encode(
        self, messages: list[dict[str, str]], *, masking: str | None = None, add_generation_prompt: bool = False
    ) -> EncodedConversation:
        """``messages`` (``[{"role": ..., "content": ...}]``) as the ids and labels training uses.

        The result has ``input_ids`` and ``labels`` (``-100`` where not supervised, under
        ``masking``, the family's default when ``None``). With ``add_generation_prompt`` the ids end
        where the model starts its reply, as ``famtune chat`` and ``famtune serve`` prompt it.
        """
        policy = masking if masking is not None else self.masking_policies[0]
        return self._checkpoint.family.encode(self.tokenizer, messages, policy, add_generation_prompt)

    def chat_template(self) -> str:
        """The family's Jinja ``chat_template`` (what ``famtune merge`` saves with the tokenizer)."""
        return self._checkpoint.family.chat_template()

    def load(self, *, quantization: str = "none", compute_dtype: str = "auto") -> Any:
        """The weights as a ``transformers`` model in eval mode, on CUDA when present, else CPU.

        ``quantization="nf4"`` loads the 4-bit base QLoRA trains on.
        """
        if quantization not in ("none", "nf4"):
            raise FamtuneError(f"quantization is {quantization!r}; expected none or nf4")
        model = self._checkpoint.load_model(quantization=quantization, compute_dtype=compute_dtype)
        self._checkpoint.check_vocabulary(model)
        return model


def open_model(model: str | os.PathLike, *, family: str | None = None, trust_remote_code: bool = False) -> Model:
    """Open a checkpoint (a directory, ``Org/Name`` or ``modelscope:Org/Name``) with its family.

    Exactly one installed family plugin must claim it; ``family`` names one instead.
    ``trust_remote_code`` allows the checkpoint's own Python code (off: famtune never runs it).
    """
    from famtune.checkpoint import open_checkpoint

    return Model(open_checkpoint(os.fspath(model), family=family, trust_remote_code=trust_remote_code))


def tiny_model(family: str, out_dir: str | os.PathLike) -> str:
    """Write a tiny random-weight checkpoint of ``family`` into ``out_dir`` and return its path.

    Its tokenizer is trained on famtune's bundled demo conversations: enough to try every function
    here (and what ``famtune demo`` trains) in seconds, with nothing downloaded.
    """
    from famtune.demo import demo_corpus
    from famtune.plugins import get_plugins

    out = os.fspath(out_dir)
    fam = get_plugins().claim({}, "", family=family)
    if not fam.tiny_checkpoint(out, demo_corpus()):
        raise FamtuneError(f"the {family} family's plugin cannot build a tiny checkpoint; try another family")
    return out


def load_chat(model: str | os.PathLike, adapter: str | os.PathLike | None = None, **options: Any) -> Chat:
    """A :class:`famtune.session.Chat` on ``model`` (a base or merged directory; with ``adapter``, the
    directory ``famtune train`` wrote): ``.chat(message, stream=False)``, ``.reset()``, ``.history``.

    ``options``: ``system=``, ``greedy=``, ``max_new_tokens=``, ``trust_remote_code=`` and sampling
    settings such as ``temperature=``. In IPython, ``%load_ext famtune`` then ``%%chat`` cells talk
    to the chat loaded last.
    """
    from famtune.notebook import remember
    from famtune.session import load_chat as load

    chat = load(os.fspath(model), None if adapter is None else os.fspath(adapter), **options)
    remember(chat)
    return chat


def generate(
    chat: Chat, messages: list[dict[str, str]], *, greedy: bool = False, max_new_tokens: int = 256, **sampling: Any
) -> str:
    """One reply to ``messages`` (ending with a user message) from the model ``chat`` holds.

    Unlike ``chat.chat(...)``, the chat's history is neither used nor changed: the prompt is
    exactly ``messages``. ``sampling`` overrides the family's defaults (``temperature=0.3`` ...).
    """
    return chat.session.reply(messages, greedy=greedy, max_new_tokens=max_new_tokens, **sampling)


def make_recipe(source: str | os.PathLike | Mapping[str, Any] | None = None, /, **overrides: Any) -> Recipe:
    """A checked training recipe from a YAML file, a dict of recipe keys, or ``overrides`` alone.

    ``overrides`` (``max_steps=100``) win over the source, as ``--max_steps 100`` does on the command
    line. A wrong key or value raises ``famtune.errors.FamtuneError`` naming it. The keys are
    documented in the project README and by ``famtune train --help``.
    """
    from famtune.recipe import load_recipe

    if isinstance(source, Mapping):
        return load_recipe(None, {**source, **overrides}, overrides_from="recipe dict")
    return load_recipe(None if source is None else os.fspath(source), overrides)


def fine_tune(
    recipe_or_source: Recipe | str | os.PathLike | Mapping[str, Any],
    /,
    *,
    resume: str | bool | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Fine-tune as ``famtune train`` does, in this process; returns the run summary (``summary.json``).

    ``recipe_or_source``: a ``make_recipe(...)``, a YAML file or a dict of recipe keys; ``overrides``
    as for ``make_recipe``. ``resume=True`` continues from the output directory's last checkpoint (or a
    checkpoint path), ``overwrite=True`` replaces an earlier run there.
    """
    from famtune.recipe import Recipe
    from famtune.train import train as run

    if isinstance(recipe_or_source, Recipe):
        if overrides:
            raise FamtuneError(f"train() got a Recipe and overrides {sorted(overrides)}; put them in make_recipe(...)")
        checked = recipe_or_source
    else:
        checked = make_recipe(recipe_or_source, **overrides)
    if resume and overwrite:
        raise FamtuneError("resume continues a run and overwrite replaces it; give one of them")
    return run(checked, resume=resume, overwrite=overwrite)


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Merge the adapter ``famtune train`` wrote into its base and save a plain model to ``out_dir``.

    ``options`` are ``famtune merge``'s: ``base=``, ``base_precision=``, ``layout=``, ``dtype=``,
    ``max_shard_size=``, ``trust_remote_code=``. Returns the merge report.
    """
    from famtune.distributed import refuse_when_sharded
    from famtune.merge import merge as run

    refuse_when_sharded("merge")
    return run(os.fspath(adapter_dir), os.fspath(out_dir), **options)
