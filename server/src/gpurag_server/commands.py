"""``gpurag serve`` (flags = `ServerSettings`) and ``gpurag load``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from gpurag_server.settings import ServerSettings


def _settings_options(function: Any) -> Any:
    """One ``--flag`` per `ServerSettings` field, defaulting to the environment's value."""
    for name, field in reversed(list(ServerSettings.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        help_text = (field.description or "") + f" [setting: {name}]"
        if annotation is bool:
            function = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=help_text)(
                function
            )
        elif name == "api_keys":
            function = click.option("--api-key", name, multiple=True, help=help_text)(function)
        else:
            kind: Any = {int: int, float: float}.get(annotation, str)  # type: ignore[arg-type]
            function = click.option(flag, name, type=kind, default=None, help=help_text)(function)
    return function


def settings_from_flags(flags: dict[str, Any]) -> ServerSettings:
    """`ServerSettings` from the environment, overridden by the flags that were given."""
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    base = ServerSettings()
    return ServerSettings.model_validate({**base.model_dump(), **given})


@click.command("serve")
@_settings_options
def serve_command(**flags: Any) -> None:
    """Serve RAG over HTTP: the default corpus unless --corpus names an index."""
    from gpurag_server.serve import serve

    try:
        settings = settings_from_flags(flags)
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc
    serve(settings)


@click.command("load")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Server to load.")
@click.option("--path", "route", default="/v1/rag", show_default=True, help="Route to POST to.")
@click.option("--rate", type=float, default=None, help="Open loop: requests/s (send times fixed in advance).")
@click.option("--arrivals", type=click.Choice(["constant", "poisson"]), default="poisson", show_default=True)
@click.option("--phases", default=None, help="Open loop in steps: 'SECONDS:RATE,...' e.g. '10:20,30:400,20:0'.")
@click.option("--clients", type=int, default=None, help="Closed loop: this many clients, each one request at a time.")
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds of load.")
@click.option("--query", "queries", multiple=True, help="Questions to send (cycled); default: a few about Python.")
@click.option("--k", type=int, default=3, show_default=True)
@click.option("--api-key", default=None, help="Bearer key.")
@click.option("--connections", type=int, default=256, show_default=True, help="Most open connections (open loop).")
@click.option(
    "--plot", type=click.Path(path_type=Path), default=None, help="PNG of latency, queue and nodes over time."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def load_command(
    url: str,
    route: str,
    rate: float | None,
    arrivals: str,
    phases: str | None,
    clients: int | None,
    duration: float,
    queries: tuple[str, ...],
    k: int,
    api_key: str | None,
    connections: int,
    plot: Path | None,
    as_json: bool,
) -> None:
    """Load a server open-loop (--rate) or closed-loop (--clients) and report latency and statuses."""
    import json

    from gpurag_server.load import LoadSpec, run_load

    steps = None
    if phases:
        try:
            steps = [(float(part.split(":")[0]), float(part.split(":")[1])) for part in phases.split(",")]
        except (ValueError, IndexError) as exc:
            raise click.BadParameter(f"expected SECONDS:RATE,...; got {phases!r}", param_hint="--phases") from exc
    if (rate is None and steps is None) == (clients is None):
        raise click.UsageError("give exactly one of --rate or --phases (open loop) and --clients (closed loop)")
    spec = LoadSpec(
        url=url,
        route=route,
        rate=rate,
        arrivals=arrivals,
        clients=clients,
        duration_s=duration,
        queries=list(queries) or None,
        k=k,
        api_key=api_key,
        max_connections=connections,
        plot=plot,
        phases=steps,
    )
    report = run_load(spec)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(report.describe())
    sys.stdout.flush()
