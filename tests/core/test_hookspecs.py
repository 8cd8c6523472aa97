"""Every hook is declared, documented, callable, and has a test here named test_hook_<name>."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import click
import pytest
from core_toys import make_plugin

from gpurag import hookspecs, plugins

HOOKS = sorted(name for name, value in vars(hookspecs).items() if name.startswith("register_") and callable(value))
DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugin_hooks.md"


def test_the_hooks_design_md_lists_are_declared() -> None:
    assert HOOKS == [
        "register_backends",
        "register_commands",
        "register_dispatchers",
        "register_embedders",
        "register_generators",
        "register_node_providers",
        "register_retrievers",
        "register_scaling_policies",
    ]


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_are_documented(hook: str) -> None:
    docs = DOCS.read_text()
    signature = "(cli)" if hook == "register_commands" else "(register)"
    assert f"## {hook}{signature}" in docs, f"docs/plugin_hooks.md has no section for {hook}"
    assert inspect.getdoc(getattr(hookspecs, hook)), f"{hook} has no docstring"


def registered_through(fresh: pytest.MonkeyPatch, hook: str, kind: str) -> Any:
    sentinel = object()
    plugins.register_plugin(make_plugin(**{hook: lambda register: register(sentinel, "probe")}), "probe-plugin")
    registration = plugins.get_registry(kind)["probe"]
    assert registration.plugin == "probe-plugin"
    return registration.obj is sentinel


def commands_added_through_the_hook() -> bool:
    group = click.Group("probe")

    def register_commands(cli: click.Group) -> None:
        @cli.command("hello")
        def hello() -> None:
            click.echo("hi")

    plugins.register_plugin(make_plugin(register_commands=register_commands), "probe-plugin")
    plugins.get_plugin_manager().hook.register_commands(cli=group)
    return "hello" in group.commands


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_delivers_what_a_plugin_registers_through_it(fresh_plugins: pytest.MonkeyPatch, hook: str) -> None:
    kind = hook.removeprefix("register_")
    if hook == "register_commands":
        assert commands_added_through_the_hook()
    else:
        assert kind in plugins.REGISTRIES, f"hook {hook} feeds no registry and has no check here"
        assert registered_through(fresh_plugins, hook, kind)
