"""gpurag-server shows up in `gpurag plugins` with what it registers and its commands."""

from __future__ import annotations

import json

from click.testing import CliRunner

from gpurag.cli import add_plugin_commands, cli


def test_the_server_plugin_is_listed_with_its_dispatchers_and_providers() -> None:
    add_plugin_commands()
    report = json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).output)
    server = next(p for p in report["plugins"] if p["distribution"] == "gpurag-server")
    assert server["registers"] == {
        "dispatchers": ["round_robin", "least_loaded"],
        "node_providers": ["local", "process"],
    }
    assert "register_commands" in server["hooks"]
    scaling = next(p for p in report["plugins"] if p["name"] == "gpurag.scaling")
    assert scaling["registers"] == {"scaling_policies": ["queue_length", "target_utilisation"]}
    assert {"serve", "load"} <= set(cli.commands)
