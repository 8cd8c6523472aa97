"""The ``gpurag`` command line; plugins add sub-commands through the ``register_commands`` hook."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from gpurag import plugins
from gpurag.errors import GpuragError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gpurag")
def cli() -> None:
    """gpurag: nearest-neighbour search on GPUs and CPUs, and RAG built on it."""


def plugin_report() -> dict[str, Any]:
    """Every loaded plugin with what it registers, each backend's availability, and the failures."""
    availability = plugins.backend_availability()
    registered: dict[str, dict[str, list[str]]] = {}
    for kind in plugins.REGISTRIES:
        for name, registration in plugins.get_registry(kind).items():
            registered.setdefault(registration.plugin, {}).setdefault(kind, []).append(name)
    manager = plugins.get_plugin_manager()
    report: list[dict[str, Any]] = []
    for info in plugins.loaded_plugins():
        module = manager.get_plugin(info.name)
        hooks = sorted(caller.name for caller in manager.get_hookcallers(module) or []) if module else []
        report.append(
            {
                "name": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "builtin": info.builtin,
                "hooks": hooks,
                "registers": registered.get(info.name, {}),
            }
        )
    backends = [
        {
            "name": name,
            "distribution": plugins.get_registry("backends")[name].distribution,
            "available": avail.available,
            "reason": avail.reason,
        }
        for name, avail in sorted(availability.items())
    ]
    failures = [{"name": f.name, "distribution": f.distribution, "error": f.error} for f in plugins.failed_plugins()]
    return {"plugins": report, "backends": backends, "auto": auto_report(), "failed": failures}


#: Query counts `gpurag plugins` asks `auto` about: one of each bucket of the measured table.
AUTO_QUERIES = (1, 64, 1024)


def auto_report(device: str | None = None) -> list[dict[str, Any]]:
    """The backend ``get_backend("auto")`` picks on ``device`` per metric and query bucket, and why."""
    from gpurag.auto import query_bucket
    from gpurag.metrics import Metric

    picks = []
    for metric in Metric:
        for queries in AUTO_QUERIES:
            entry: dict[str, Any] = {"metric": metric.value, "queries": query_bucket(queries)}
            try:
                backend, reason = plugins.auto_choice(device, metric=metric, queries=queries)
                entry.update(backend=backend.name, device=backend.device, reason=reason)
            except GpuragError as exc:
                entry.update(backend=None, device=None, reason=str(exc).splitlines()[0])
            picks.append(entry)
    return picks


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_command(as_json: bool) -> None:
    """List installed plugins, what they register, and which backends can run here."""
    report = plugin_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo("Backends:")
    for backend in report["backends"]:
        state = "available" if backend["available"] else f"unavailable: {backend['reason']}"
        click.echo(f"  {backend['name']:<10} {backend['distribution']:<16} {state}")
    click.echo("auto picks (backend on the default device, per metric and query bucket, and why):")
    for pick in report["auto"]:
        chosen = f"{pick['backend']} ({pick['device']})" if pick["backend"] else "none"
        click.echo(f"  {pick['metric']:<7} Q {pick['queries']:<5} {chosen:<16} {pick['reason']}")
    click.echo("Plugins:")
    for plugin in report["plugins"]:
        what = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in sorted(plugin["registers"].items()))
        what = what or f"hooks: {', '.join(plugin['hooks'])}"
        click.echo(f"  {plugin['name']:<26} {plugin['distribution']} {plugin['version']}  {what}")
    if report["failed"]:
        click.echo("Failed to load:")
        for failure in report["failed"]:
            click.echo(f"  {failure['name']} ({failure['distribution']}): {failure['error']}")


_commands_added = False


def add_plugin_commands() -> None:
    """Let every plugin add its sub-commands (once)."""
    global _commands_added
    if not _commands_added:
        plugins.get_plugin_manager().hook.register_commands(cli=cli)
        _commands_added = True


def main() -> None:
    """Entry point of the ``gpurag`` script; gpurag's own errors are one line on standard error, exit 1."""
    try:
        add_plugin_commands()
        status = cli(standalone_mode=False)
        if isinstance(status, int) and status:
            sys.exit(status)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except GpuragError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
