"""The famtune plugin contract: every hook a plugin can implement.

A plugin is a module in the ``famtune`` entry-point group implementing some of these hooks with
``@famtune.hookimpl``. Only the core declares hooks (``hookspec`` is private to this file). The
core calls them through the typed methods of ``famtune.plugins.PluginSet``, which call
``pm.hook.famtune_*`` so pluggy's ordering (``tryfirst``/``trylast``), ``firstresult`` and
wrappers all apply. famtune's own defaults are an ordinary plugin (``famtune.builtins``) whose
hooks are ``trylast``, so any installed plugin comes first.

Registrar hooks (``famtune_register_*``) receive a ``register`` callback and hand it objects; the
core type-checks each one and stops with an error naming both plugins when two register the
same name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("famtune")


@hookspec
def famtune_register_families(register: Callable[[Any], None]) -> None:
    """Called once when plugins are loaded, on every plugin.

    Call ``register(family)`` for each ``famtune.family.ModelFamily`` the plugin provides. Exactly
    one family must claim a checkpoint; two plugins registering one family name are both disabled.
    Not firstresult: every plugin registers.
    """


@hookspec
def famtune_register_masking_policies(register: Callable[[Any], None]) -> None:
    """Called once when plugins are loaded, on every plugin.

    Call ``register(policy)`` with ``famtune.family.MaskingPolicy`` objects: labelling rules any
    family (or the families the policy names) can train with, selected by ``masking:`` in a recipe.
    Not firstresult: every plugin registers.
    """


@hookspec
def famtune_register_data_formats(register: Callable[[Any], None]) -> None:
    """Called once when plugins are loaded, on every plugin.

    Call ``register(fmt)`` with ``famtune.family.DataFormat`` objects: training-data record formats
    detected by their marker key (``data_format:`` in a recipe or ``auto``).
    Not firstresult: every plugin registers.
    """


@hookspec
def famtune_register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Called when the ``famtune`` command line is built, on every plugin.

    Add subcommands with ``subparsers.add_parser(name, help=...)`` and set their handler with
    ``parser.set_defaults(func=handler)``; ``handler(args, extra)`` returns the exit code. Import
    heavy libraries inside the handler: this hook runs for ``famtune --help`` too.
    Not firstresult: every plugin adds its commands.
    """


@hookspec
def famtune_training_callbacks(recipe: Any) -> list[Any]:
    """Called when a training run starts, on every plugin; results are concatenated.

    ``recipe`` is the run's ``famtune.recipe.Recipe``. Return objects with any of the methods
    ``on_train_begin(info: dict)``, ``on_log(step: int, metrics: dict)`` and
    ``on_train_end(summary: dict)`` (trackers, early stopping, notifications), or an empty list.
    Not firstresult: every plugin's callbacks run.
    """


@hookspec(firstresult=True)
def famtune_resolve_model_source(spec: str) -> str | None:
    """Called when a model is opened, before the claim, until one plugin answers.

    ``spec`` is what the user wrote (``model:`` in a recipe, ``--model``). Return the local
    directory holding that checkpoint (downloading it if needed), or ``None`` if the spec is not
    yours. famtune's own resolvers (local directory, ``Org/Name`` on the Hugging Face hub,
    ``modelscope:Org/Name``) are ``trylast``. Stops at first non-None result.
    """


@hookspec
def famtune_recipe_dirs() -> list[str]:
    """Called by ``famtune recipes list`` and ``famtune recipes copy``, on every plugin.

    Return directories holding the plugin's built-in recipes: ``NAME.yaml`` files (ordinary
    recipes whose first comment line describes them) and any data files they name by a relative
    path. Recipe names must be unique across plugins. Not firstresult: every plugin answers.
    """
