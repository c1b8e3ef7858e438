"""The shipped dashboard and alerting rules: valid for their tools, and about metrics the
proxy really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from tests.conftest import StartProxy, StartUpstream
from tests.helpers import Echo

MONITORING = Path(__file__).parent.parent / "deploy" / "monitoring"
ONLY_WITH_TLS = {"tokenrelay_listener_cert_expiry_seconds"}  # exported with listen.tls only

# The parts of Grafana's dashboard model (schemaVersion 39) that this dashboard uses.
DASHBOARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["type", "title", "id", "gridPos"],
                "properties": {
                    "type": {"enum": ["row", "timeseries", "stat", "table"]},
                    "id": {"type": "integer"},
                    "gridPos": {
                        "type": "object",
                        "required": ["h", "w", "x", "y"],
                        "properties": {
                            "w": {"type": "integer", "minimum": 1, "maximum": 24},
                            "x": {"type": "integer", "minimum": 0, "maximum": 23},
                        },
                    },
                    "targets": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["refId", "expr"],
                            "properties": {"expr": {"type": "string", "minLength": 1}},
                        },
                    },
                },
            },
        },
    },
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:  # Debian's prometheus package brings it
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "prometheus"], check=True)
        found = shutil.which("promtool")
    assert found is not None
    return found


def test_alerting_rules_pass_promtool_check_and_their_unit_tests() -> None:
    tool = promtool()
    check = subprocess.run(
        [tool, "check", "rules", "alerts.yaml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [tool, "test", "rules", "alerts.test.yaml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MONITORING / "dashboard.json").read_text())
    return data


def test_the_dashboard_is_a_valid_grafana_dashboard_with_one_row_per_concern() -> None:
    dash = dashboard()
    jsonschema.validate(dash, DASHBOARD_SCHEMA)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows[:5] == ["Traffic", "Errors", "Tokens", "Replays", "Upstream latency"]
    for p in dash["panels"]:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


def expressions() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return exprs


def test_every_alert_has_a_runbook_in_the_readme() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        assert f"**{rule['alert']}**" in readme, rule["alert"]


async def test_dashboard_and_alerts_name_only_metrics_the_proxy_exports(
    start_proxy: StartProxy,
    start_upstream: StartUpstream,
    echo: tuple[Echo, URL],
    client: aiohttp.ClientSession,
) -> None:
    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "at", "expires_in": 600})

    idp_app = web.Application()
    idp_app.router.add_post("/token", token)
    idp = await start_upstream(idp_app)
    _, up = echo
    provider = {"grant": "client_credentials", "token_url": f"{idp}/token"}
    provider |= {"client_id": "c", "client_secret": "s"}
    proxy = await start_proxy(
        f"providers:\n  p: {json.dumps(provider)}\n"
        f"routes:\n  - {{prefix: /a/, upstream: '{up}/', provider: p}}\n"
    )
    async with client.get(proxy.url / "a" / "x") as resp:
        assert resp.status == 200
    async with client.get(proxy.url / "-" / "metrics") as resp:
        text = await resp.text()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    named = {m for e in expressions() for m in re.findall(r"\b(?:tokenrelay|process)_\w+", e)}
    missing = named - exported - ONLY_WITH_TLS
    assert not missing, f"not exported: {sorted(missing)}"
