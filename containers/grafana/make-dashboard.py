#!/usr/bin/env python3
"""Writes containers/grafana/smtp-tls-proxy.json, the Grafana dashboard of the proxy's metrics.
The panels' PromQL lives here once; tests/it/dashboard.rs checks every metric it names
against a live /metrics scrape and `promtool check rules` over the expressions."""
import json, os, sys

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'

PANELS = [
    ("Sessions/s by listener and outcome", "timeseries", "reqps",
     [f'sum by (listener, outcome) (rate(smtp_proxy_sessions_total{{{SEL}}}[$__rate_interval]))']),
    ("Sessions in progress", "timeseries", "short",
     [f'sum by (listener) (smtp_proxy_connections_active{{{SEL}}})']),
    ("Handshake failures/s by reason", "timeseries", "reqps",
     [f'sum by (listener, reason) (rate(smtp_proxy_tls_handshakes_total{{{SEL},result="failed"}}[$__rate_interval]))']),
    ("TLS versions and ciphers", "piechart", "short",
     [f'sum by (version, cipher) (increase(smtp_proxy_tls_sessions_total{{{SEL}}}[$__range]))']),
    ("Refused sessions/s by reason", "timeseries", "reqps",
     [f'sum by (listener, outcome) (rate(smtp_proxy_sessions_total{{{SEL},outcome=~"limit|denied"}}[$__rate_interval]))']),
    ("Upstream up", "stat", "short",
     [f'min by (upstream) (smtp_proxy_upstream_up{{{SEL}}})']),
    ("Upstream connect latency p50 / p99", "timeseries", "s",
     [f'histogram_quantile(0.5, sum by (upstream, le) (rate(smtp_proxy_upstream_connect_seconds_bucket{{{SEL}}}[$__rate_interval])))',
      f'histogram_quantile(0.99, sum by (upstream, le) (rate(smtp_proxy_upstream_connect_seconds_bucket{{{SEL}}}[$__rate_interval])))']),
    ("Upstream connect failures/s by reason", "timeseries", "reqps",
     [f'sum by (upstream, reason) (rate(smtp_proxy_upstream_connect_failures_total{{{SEL}}}[$__rate_interval]))']),
    ("Reloads", "timeseries", "short",
     [f'sum by (result) (increase(smtp_proxy_reloads_total{{{SEL}}}[$__rate_interval]))']),
    ("Days until certificate expiry", "table", "d",
     [f'min by (certificate, origin) ((smtp_proxy_certificate_expiry_timestamp_seconds{{{SEL}}} - time()) / 86400)']),
    ("Key changes (update TLSA records)", "timeseries", "short",
     [f'sum by (name) (increase(smtp_proxy_certificate_key_changes_total{{{SEL}}}[$__rate_interval]))']),
    ("ACME events", "timeseries", "short",
     [f'sum by (domains, event) (increase(smtp_proxy_acme_events_total{{{SEL}}}[$__rate_interval]))']),
    ("Relayed bytes/s", "timeseries", "Bps",
     [f'sum by (listener, direction) (rate(smtp_proxy_relayed_bytes_total{{{SEL}}}[$__rate_interval]))']),
    ("Smuggling guard and follower refusals", "timeseries", "short",
     [f'sum by (listener, action) (increase(smtp_proxy_smuggling_guard_sessions_total{{{SEL}}}[$__rate_interval]))',
      f'sum by (listener, command) (increase(smtp_proxy_follower_refusals_total{{{SEL}}}[$__rate_interval]))']),
    ("MTA-STS policy fetches/s", "timeseries", "reqps",
     [f'sum by (domain, result) (rate(smtp_proxy_mta_sts_requests_total{{{SEL}}}[$__rate_interval]))']),
]

panels = []
for i, (title, kind, unit, exprs) in enumerate(PANELS):
    panels.append({
        "id": i + 1, "title": title, "type": kind, "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(65 + j), "datasource": DS, "expr": e,
                     "legendFormat": "__auto"} for j, e in enumerate(exprs)],
    })
dashboard = {
    "title": "smtp-tls-proxy", "uid": "smtp-tls-proxy", "schemaVersion": 39, "version": 1,
    "tags": ["smtp", "tls", "mail"], "time": {"from": "now-6h", "to": "now"}, "refresh": "1m",
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        {"name": "instance", "type": "query", "datasource": DS, "includeAll": True, "multi": True,
         "query": {"query": "label_values(smtp_proxy_connections_total, instance)", "refId": "instance"},
         "refresh": 2, "allValue": ".*"},
    ]},
    "panels": panels,
}
# Default: the committed file beside this script; tests/it/dashboard.rs writes elsewhere and
# compares, so the JSON cannot drift from its source.
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "smtp-tls-proxy.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=1)
    f.write("\n")
