"""deploy/grafana: the dashboard's shape and PromQL, and the provisioning files compose mounts."""

from __future__ import annotations

import pytest

from deploy_support import DEPLOY, dashboard, dashboard_exprs, load_yaml, parse_promql, quantiles, selectors

PROVISIONING = DEPLOY / "grafana" / "provisioning"
DS_VAR = "${datasource}"


def _panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_dashboard_identity():
    d = dashboard()
    assert d["uid"] == "loraplex-overview" and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_panels_fit_the_grid_without_overlapping():
    taken: dict[tuple[int, int], str] = {}
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, f"{p['title']} leaves the 24-column grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{p['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = p["title"]


def test_panels_query_the_datasource_variable():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in _panels():
        assert p["targets"], f"panel {p['title']} has no query"
        assert p["datasource"]["uid"] == DS_VAR
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        assert all(t["datasource"]["uid"] == DS_VAR for t in p["targets"])


@pytest.mark.parametrize("expr", dashboard_exprs())
def test_dashboard_expr_parses(expr):
    parse_promql(expr)


def test_dashboard_covers_the_serving_signals():
    exprs = dashboard_exprs()
    used = {s.name for e in exprs for s in selectors(e)}
    assert {"loraplex_generated_tokens_total", "loraplex_requests_total", "loraplex_requests_waiting",
            "loraplex_requests_running", "loraplex_batch_size_bucket", "loraplex_step_seconds_bucket",
            "loraplex_kv_blocks_used", "loraplex_kv_blocks_total", "loraplex_adapters_resident",
            "loraplex_adapter_loads_total", "loraplex_adapter_evictions_total",
            "loraplex_tenant_generated_tokens_total"} <= used
    found = {q for e in exprs for q in quantiles(e)}
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "request_latency_seconds"):
        assert {(0.5, f"loraplex_{hist}_bucket"), (0.99, f"loraplex_{hist}_bucket")} <= found, hist
    assert any("by (status)" in e and "loraplex_requests_total" in e for e in exprs), "RPC rate by status"


def test_datasource_provisioning():
    data = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")
    assert data["apiVersion"] == 1
    (ds,) = data["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True and ds["access"] == "proxy"
    assert ds["url"].startswith("http://")


def test_dashboard_provisioning():
    data = load_yaml(PROVISIONING / "dashboards" / "loraplex.yml")
    assert data["apiVersion"] == 1
    (provider,) = data["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
