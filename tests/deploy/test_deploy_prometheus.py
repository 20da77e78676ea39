"""deploy/prometheus/rules: the rule-file structure Prometheus loads, and PromQL that parses."""

from __future__ import annotations

import re

import promql_parser
import pytest

from deploy_support import DEPLOY, alert_rules, load_yaml, parse_promql, selectors

RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
GROUP_KEYS = {"name", "rules", "interval", "limit", "query_offset", "labels"}
ALERT_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
SEVERITIES = {"critical", "warning", "info"}
# Go templates the annotations may use: $value or a label, optionally through a humanize function.
TEMPLATE = re.compile(r"\s*\$(value|labels\.\w+)(\s*\|\s*(humanize|humanizePercentage|humanizeDuration))?\s*")


def test_rule_files_exist():
    assert RULE_FILES, "no rule files under deploy/prometheus/rules"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rule_file_structure(path):
    data = load_yaml(path)
    assert set(data) == {"groups"}, f"top level must be only `groups`, got {sorted(data)}"
    names = [g["name"] for g in data["groups"]]
    assert names and len(names) == len(set(names)), "groups need unique names"
    for group in data["groups"]:
        assert set(group) <= GROUP_KEYS, f"unknown group keys {sorted(set(group) - GROUP_KEYS)}"
        assert group["rules"], f"group {group['name']} has no rules"
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), f"a rule is either alert or record: {rule}"


def test_alert_names_are_unique_camel_case():
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"Loraplex[A-Z][A-Za-z0-9]+", n) for n in names), names


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_rule(rule):
    assert set(rule) <= ALERT_KEYS, f"unknown keys {sorted(set(rule) - ALERT_KEYS)}"
    parse_promql(rule["expr"])  # raises ValueError with the parser's message
    assert promql_parser.parse_duration(rule["for"]).total_seconds() > 0, "`for` must be a positive duration"
    assert rule["labels"]["severity"] in SEVERITIES
    assert {"summary", "description"} <= set(rule["annotations"])
    for text in rule["annotations"].values():
        assert text.count("{{") == text.count("}}"), f"unbalanced template in {text!r}"
        for body in re.findall(r"\{\{(.*?)\}\}", text):
            assert TEMPLATE.fullmatch(body), f"unexpected template {{{{{body}}}}}"


def test_the_parser_rejects_bad_promql():
    for bad in ('rate(loraplex_requests_total[5m]', "no_such_function(x)", "x{status=}", "sum(x) >"):
        with pytest.raises(ValueError):
            parse_promql(bad)


def test_alerts_cover_errors_queue_wait_kv_cache_and_adapter_loads():
    used = {s.name for r in alert_rules() for s in selectors(r["expr"])}
    assert {"loraplex_requests_total", "loraplex_queue_wait_seconds_bucket", "loraplex_kv_blocks_used",
            "loraplex_kv_blocks_total", "loraplex_adapter_load_failures_total"} <= used
    error_rule = next(r for r in alert_rules() if r["alert"] == "LoraplexHighErrorRate")
    assert 'status!="OK"' in error_rule["expr"].replace(" ", "")
