"""Every metric the dashboard, the alert rules and the autoscaling path query is one the server
exports (names from the real Metrics registry, read out of the PromQL syntax tree)."""

from __future__ import annotations

import re

import pytest

from deploy_support import (DEPLOY, TARGET_LABELS, alert_rules, dashboard, dashboard_exprs, exported_series,
                            kustomize, load_yaml, quantiles, selectors)


def _adapter_rule_queries() -> list[str]:
    """prometheus-adapter rules, their Go templates filled as the adapter would."""
    rules = load_yaml(DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml")["rules"]["custom"]
    out = []
    for rule in rules:
        series = selectors(rule["seriesQuery"])[0].name
        query = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", 'namespace="ns",pod=~"a|b"').replace("<<.GroupBy>>", "pod"))
        out += [rule["seriesQuery"], query]
    return out


def _all_exprs() -> list[tuple[str, str]]:
    exprs = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    exprs += [(f"dashboard #{i}", e) for i, e in enumerate(dashboard_exprs())]
    exprs += [(f"prometheus-adapter #{i}", e) for i, e in enumerate(_adapter_rule_queries())]
    return exprs


def test_exported_series_come_from_the_registry():
    series = exported_series()
    assert series["loraplex_requests_total"] == {"method", "status", "adapter", "frontend"}
    assert series["loraplex_queue_wait_seconds_bucket"] == {"le"}
    assert "loraplex_queue_wait_seconds_sum" in series and "loraplex_requests_waiting" in series
    assert "loraplex_requests" not in series and "loraplex_queue_wait_seconds" not in series


def test_selector_extraction_reads_the_syntax_tree():
    expr = ('sum by (le) (rate(a_bucket{x="1", le!=""}[5m])) / on() group_left '
            'max_over_time(b[1h:1m]) > bool scalar(c_total offset 5m) or label_replace(d, "y", "$1", "z", "(.*)")')
    found = {s.name: s.labels for s in selectors(expr)}
    assert found == {"a_bucket": {"x", "le"}, "b": set(), "c_total": set(), "d": set()}
    assert quantiles('histogram_quantile(0.9, sum by (le) (rate(h_bucket[5m]))) + '
                     'histogram_quantile(0.5, rate(g_bucket[5m]))') == {(0.9, "h_bucket"), (0.5, "g_bucket")}


@pytest.mark.parametrize("where,expr", _all_exprs(), ids=lambda v: v if len(v) < 40 else "")
def test_queried_metrics_are_exported(where, expr):
    series = exported_series()
    for sel in selectors(expr):
        assert sel.name, f"{where}: selector without a metric name in {expr!r}"
        assert sel.name in series, f"{where}: {sel.name} is not exported by the server"
        unknown = sel.labels - series[sel.name] - TARGET_LABELS
        assert not unknown, f"{where}: {sel.name} has no label(s) {sorted(unknown)}"


def test_dashboard_variable_queries_use_exported_metrics():
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+), *(\w+)\)", var["definition"])
            assert metric and metric[1] in exported_series(), var["definition"]


def test_autoscaler_metric_is_served_by_the_adapter_rule():
    _, docs = kustomize("base")
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    rules = load_yaml(DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml")["rules"]["custom"]
    served = {r["name"]["as"] for r in rules}
    assert names == {"loraplex_requests_waiting"} and names <= served
    assert names <= set(exported_series())
