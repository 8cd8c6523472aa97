"""Every hook a gpurag plugin can implement.

Each registration hook receives ``register(obj, name)``: call it once per thing the plugin adds.
Two plugins registering one name is a `PluginError` naming both. The hooks return nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("gpurag")
hookimpl = pluggy.HookimplMarker("gpurag")

#: The callable a registration hook receives: ``register(obj, name)``.
Register = Callable[[Any, str], None]


@hookspec
def register_backends(register: Register) -> None:
    """Register `DistanceBackend` subclasses, each under its name (``numpy``, ``torch``, ``cuda``).

    Called once, the first time a backend is looked up. Register the class, not an instance;
    importing the class must not import heavy libraries (torch, cupy): do that in its methods.

    :param register: ``register(backend_class, name)``
    """


@hookspec
def register_retrievers(register: Register) -> None:
    """Register `Retriever` subclasses under their names (``exact``, ``lsh``).

    Called once, the first time a retriever is looked up by name.

    :param register: ``register(retriever_class, name)``
    """


@hookspec
def register_embedders(register: Register) -> None:
    """Register embedder factories: callables ``factory(model: str | None, device: str | None)``.

    Called once, the first time an embedder is looked up by name; the factory loads its model
    only when called.

    :param register: ``register(factory, name)``
    """


@hookspec
def register_generators(register: Register) -> None:
    """Register generator factories: callables ``factory(**options)`` returning a generator.

    Called once, the first time a generator is looked up by name (``extractive``,
    ``transformers``, ``openai``).

    :param register: ``register(factory, name)``
    """


@hookspec
def register_dispatchers(register: Register) -> None:
    """Register dispatcher classes, which pick the compute node for each batch (``round_robin``).

    Called once by the server when it resolves its dispatcher setting.

    :param register: ``register(dispatcher_class, name)``
    """


@hookspec
def register_node_providers(register: Register) -> None:
    """Register node-provider classes, which start, drain and call compute nodes (``local``, ``ray``).

    Called once by the server when it resolves its node-provider setting.

    :param register: ``register(provider_class, name)``
    """


@hookspec
def register_scaling_policies(register: Register) -> None:
    """Register scaling-policy classes, which turn queue statistics into a wanted node count.

    Called once by the autoscaler when it resolves its policy setting.

    :param register: ``register(policy_class, name)``
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add sub-commands to the ``gpurag`` command line.

    Called once when the command line starts.

    :param cli: the top-level ``click.Group``; use ``@cli.command()`` or ``cli.add_command``.
    """
