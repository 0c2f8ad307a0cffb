#!/usr/bin/env python3
"""Structural checks of deploy/, run by deploy/check.sh.

The tools (promtool, kubernetes-validate, check-jsonschema, systemd-analyze)
check each file's own syntax and schema; this checks what no tool knows: that
the files agree with each other and with the gateway. The spool directory,
the port, the probes' paths, the drain timing, the token variables, the topics
and the metric names are read from config.container.toml and src/metrics.rs
and must match in the Dockerfile, docker-compose.yml, the Kubernetes
manifests, the systemd unit, the alert rules and the dashboard.

With --smoke BIN it also runs the real binary with config.container.toml:
check-config, /healthz through the Dockerfile's HEALTHCHECK command, /readyz,
a signed callback, /metrics, and the SIGTERM drain against the grace periods.

Usage: check_deploy.py [--smoke BIN] [--kustomized DIR] [--counts FILE]
  --kustomized DIR: DIR/<overlay>.yaml holds `kubectl kustomize` output for
  each folder in deploy/kubernetes/; without it the kustomizations' plain
  resources are read directly (patches are then not applied).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
CONFIG_FILE = DEPLOY / "config.container.toml"

REQUIRED_ALERTS = [
    "TimbridgeKafkaDown",
    "TimbridgeSpoolLagGrowing",
    "TimbridgeSpoolNearlyFull",
    "TimbridgeRejectionsSpiking",
    "TimbridgeOverloaded",
    "TimbridgeDeadLetters",
    "TimbridgeDown",
    "TimbridgeUpstreamFailing",
]
READYZ_KEYS = {"ready", "reason", "spool_has_room", "draining", "kafka_reachable", "upstream_reachable"}
# What the runtime image has: debian:bookworm-slim's base (libc6, libgcc-s1,
# zlib1g) and what the Dockerfile installs (libssl3: libssl, libcrypto).
RUNTIME_LIBS = {"linux-vdso", "libc", "libm", "libgcc_s", "libz", "ld-linux-x86-64",
                "ld-linux-aarch64", "libpthread", "libdl", "librt", "libssl", "libcrypto"}
GRACE_MARGIN_S = 5
# timbridge's container resources, from the load harness (README, Performance).
TIMBRIDGE_RESOURCES = {"requests": {"cpu": "250m", "memory": "48Mi"}, "limits": {"memory": "128Mi"}}

results: list[tuple[str, str, str]] = []  # (status, name, detail)


class Skip(Exception):
    pass


CHECKS: list[tuple[str, object]] = []


def check(name: str):
    """Registers a check; main() runs them in order, each on its own."""
    def wrap(fn):
        CHECKS.append((name, fn))
        return fn
    return wrap


def run_checks() -> None:
    for name, fn in CHECKS:
        try:
            fn()
            results.append(("ok", name, ""))
        except Skip as s:
            results.append(("skip", name, str(s)))
        except AssertionError as e:
            results.append(("FAIL", name, str(e) or traceback.format_exc(limit=2)))
        except Exception:  # a crash in a check is a failure of that check
            results.append(("FAIL", name, traceback.format_exc(limit=3)))


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; Kubernetes and
    compose files with a repeated key are almost always a mistake."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_all(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=UniqueKeyLoader) if d is not None]


def load_yaml(path: Path):
    docs = load_yaml_all(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def duration_s(text: str) -> float:
    total = 0.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), f"cannot read duration {text!r}"
    for n, u in parts:
        total += float(n) * units[u]
    return total


CONFIG_TEXT = CONFIG_FILE.read_text()
CONFIG = tomllib.loads(CONFIG_TEXT)
LISTEN_PORT = int(CONFIG["server"]["listen"].rsplit(":", 1)[1])
# Probes and the scrape go to server.admin_listen when it is set.
ADMIN_LISTEN = CONFIG["server"].get("admin_listen")
ADMIN_PORT = int(ADMIN_LISTEN.rsplit(":", 1)[1]) if ADMIN_LISTEN else LISTEN_PORT
SPOOL_DIR = CONFIG["spool"]["dir"]
DRAIN_S = duration_s(CONFIG["server"].get("drain_delay", "0s"))
SHUTDOWN_S = duration_s(CONFIG["server"].get("shutdown_timeout", "10s"))
MIN_GRACE_S = DRAIN_S + SHUTDOWN_S + GRACE_MARGIN_S
TOKEN_ENVS = [a["token_env"] for a in CONFIG["apps"] if "token_env" in a]


def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes)


# --------------------------------------------------------------------------
# Every file
# --------------------------------------------------------------------------

@check("yaml: every .yml/.yaml file parses, without duplicate keys")
def _():
    files = deploy_files(".yml", ".yaml")
    assert len(files) >= 15, f"only {len(files)} YAML files found"
    bad = []
    for p in files:
        try:
            load_yaml_all(p)
        except yaml.YAMLError as e:
            bad.append(f"{p.relative_to(DEPLOY)}: {e}")
    assert not bad, "\n".join(bad)


@check("config.container.toml: the values every deployment relies on")
def _():
    s = CONFIG["server"]
    assert s["listen"].startswith("0.0.0.0:"), "a container must listen on all addresses"
    assert ADMIN_LISTEN and ADMIN_LISTEN.startswith("0.0.0.0:") and ADMIN_PORT != LISTEN_PORT, \
        "probes and the scrape need server.admin_listen on all addresses, on a port of its own"
    assert DRAIN_S == 5, f"drain_delay is {DRAIN_S}s, the brief says 5s"
    assert SPOOL_DIR == "/var/lib/timbridge/spool", SPOOL_DIR
    assert CONFIG["log"]["format"] == "json"
    assert TOKEN_ENVS and all("token" not in a for a in CONFIG["apps"]), "tokens must come from token_env"


@check("README.md: names every file in deploy/ and every alert")
def _():
    readme = (DEPLOY / "README.md").read_text()
    missing = []
    for p in sorted(DEPLOY.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.name != "README.md":
            rel = str(p.relative_to(DEPLOY))
            # a folder's files may be named by the folder (kubernetes/sidecar/)
            if rel not in readme and p.name not in readme and f"{p.parent.relative_to(DEPLOY)}/" not in readme:
                missing.append(rel)
    missing += [a for a in REQUIRED_ALERTS if a not in readme]
    assert not missing, f"README.md does not mention: {missing}"


# --------------------------------------------------------------------------
# Prometheus rules and the metric names
# --------------------------------------------------------------------------

def defined_metrics() -> set[str]:
    # The gateway's series are declared in src/metrics.rs, the materializer's
    # in src/materialize/metrics.rs.
    src = "".join((ROOT / "src" / f).read_text() for f in ("metrics.rs", "materialize/metrics.rs"))
    return set(re.findall(r'"(timbridge_[a-z0-9_]+)"', src))


def base_name(name: str) -> str:
    """A histogram's series name (_bucket, _sum, _count) → the metric's name."""
    m = re.fullmatch(r"(.+)_(bucket|sum|count)", name)
    return m.group(1) if m and m.group(1) in defined_metrics() else name


def referenced_metrics(expr: str) -> set[str]:
    return {base_name(n) for n in re.findall(r"\b(timbridge_[a-z0-9_]+)", expr)}


COMPOSE = load_yaml(DEPLOY / "docker-compose.yml")
ALERTS = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
RULES = {r["alert"]: r for g in ALERTS["groups"] for r in g["rules"] if "alert" in r}


@check("alerts.yml: the required alerts, each with severity, summary and description")
def _():
    missing = [a for a in REQUIRED_ALERTS if a not in RULES]
    assert not missing, f"missing alerts: {missing}"
    for name, r in RULES.items():
        assert r.get("labels", {}).get("severity") in ("page", "ticket"), f"{name}: severity"
        ann = r.get("annotations", {})
        assert ann.get("summary"), f"{name}: no summary"
        # what is wrong and what to do: a real paragraph
        assert len(ann.get("description", "")) > 200, f"{name}: description too short"
    assert 'timbridge_kafka_up == 0' in RULES["TimbridgeKafkaDown"]["expr"]
    assert RULES["TimbridgeKafkaDown"]["for"] == "2m"
    assert RULES["TimbridgeSpoolLagGrowing"]["for"] == "5m"
    assert RULES["TimbridgeSpoolNearlyFull"]["for"] == "5m"
    assert "> 0.8" in RULES["TimbridgeSpoolNearlyFull"]["expr"]
    assert "increase(timbridge_dead_letter_total[10m]) > 0" in RULES["TimbridgeDeadLetters"]["expr"]


@check("alerts.yml and the dashboard use only metrics that src/metrics.rs defines")
def _():
    known = defined_metrics()
    assert len(known) >= 20, f"found only {len(known)} metric names in src/metrics.rs"
    exprs = [r["expr"] for r in RULES.values()] + [e for _, e in dashboard_exprs()]
    unknown = set()
    for e in exprs:
        unknown |= referenced_metrics(e) - known
    assert not unknown, f"not defined in src/metrics.rs: {sorted(unknown)}"


@check("alerts_test.yml: every alert has a case where it fires and one where it does not")
def _():
    tests = load_yaml(DEPLOY / "prometheus" / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    fires, quiet = set(), set()
    for t in tests["tests"]:
        for a in t.get("alert_rule_test", []):
            (fires if a.get("exp_alerts") else quiet).add(a["alertname"])
    for name in RULES:
        assert name in fires, f"{name}: no test where it fires"
        assert name in quiet, f"{name}: no test where it stays quiet"


@check("prometheus.yml: scrapes timbridge's admin port and loads alerts.yml")
def _():
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert prom["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert "timbridge" in jobs
    targets = [t for sc in jobs["timbridge"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"timbridge:{ADMIN_PORT}"], targets
    assert re.search(RULES["TimbridgeDown"]["expr"].split('job=~"')[1].split('"')[0], "timbridge")


# --------------------------------------------------------------------------
# Grafana
# --------------------------------------------------------------------------

DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "timbridge.json").read_text())


def all_panels() -> list[dict]:
    out = []
    for p in DASHBOARD["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in all_panels() for t in p.get("targets", [])]


def promql_for_promtool(expr: str) -> str:
    """The dashboard's variables, replaced so promtool can parse the query."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
            .replace("$__interval", "1m").replace("$instance", ".*"))


@check("dashboard: datasource variable, unique ids, no overlapping panels, every query on ${datasource}")
def _():
    tvars = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert tvars["datasource"]["type"] == "datasource" and tvars["datasource"]["query"] == "prometheus"
    assert DASHBOARD["uid"] == "timbridge"
    ids = [p["id"] for p in all_panels()]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], int] = {}
    for p in all_panels():
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{p['title']}: wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['id']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], f"{p['title']}: no query"
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}", p["title"]
    titles = " ".join(p["title"].lower() for p in all_panels())
    exprs = " ".join(e for _, e in dashboard_exprs())
    for want in ["outcome", "latency", "kafka connected", "errors by reason", "spool bytes", "oldest", "dead letters"]:
        assert want in titles, f"no panel about {want!r}"
    for want in ["histogram_quantile(0.5, sum by (le) (rate(timbridge_callback_duration_seconds_bucket",
                 "histogram_quantile(0.99, sum by (le) (rate(timbridge_callback_duration_seconds_bucket",
                 "histogram_quantile(0.99, sum by (le) (rate(timbridge_kafka_delivery_seconds_bucket",
                 "timbridge_spool_max_bytes", "sum by (reason) (rate(timbridge_kafka_errors_total"]:
        assert want in exprs, f"no query with {want!r}"


def write_dashboard_rules(path: Path) -> None:
    """Every dashboard query as a recording rule, for `promtool check rules`."""
    rules = [{"record": f"dashboard:panel_{i}", "expr": promql_for_promtool(e)}
             for i, (_, e) in enumerate(dashboard_exprs())]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))


@check("grafana provisioning: the datasource is the compose Prometheus, the provider reads the mounted dashboards")
def _():
    ds = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    d = ds["datasources"][0]
    assert d["type"] == "prometheus" and d["url"] == "http://prometheus:9090"
    prov = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "timbridge.yml")
    path = prov["providers"][0]["options"]["path"]
    graf = COMPOSE["services"]["grafana"]
    assert f"./grafana/dashboards:{path}:ro" in graf["volumes"], graf["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in graf["volumes"]


# --------------------------------------------------------------------------
# Docker
# --------------------------------------------------------------------------

DOCKERFILE_INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
                           "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}


def dockerfile_commands() -> list:
    """The Dockerfile through BuildKit's own parser (PyPI `dockerfile`)."""
    import dockerfile
    return list(dockerfile.parse_file(str(DEPLOY / "Dockerfile")))


def healthcheck_command() -> list[str]:
    hc = [c for c in dockerfile_commands() if c.cmd == "HEALTHCHECK"]
    assert len(hc) == 1 and hc[0].json and hc[0].value[0] == "CMD", "one HEALTHCHECK CMD [...] (exec form)"
    return list(hc[0].value[1:])


@check("Dockerfile: builder and slim runtime, non-root, spool VOLUME, config, port, entrypoint, HEALTHCHECK")
def _():
    cmds = dockerfile_commands()
    unknown = [f"line {c.start_line}: {c.cmd}" for c in cmds if c.cmd not in DOCKERFILE_INSTRUCTIONS]
    assert not unknown, f"unknown instructions: {unknown}"
    froms = [c for c in cmds if c.cmd == "FROM"]
    assert len(froms) == 2, "two stages"
    assert froms[0].value == ("rust:1-bookworm", "AS", "builder"), froms[0].original
    assert froms[1].value == ("debian:bookworm-slim",), froms[1].original
    builder = cmds[:cmds.index(froms[1])]
    runtime = cmds[cmds.index(froms[1]):]
    get = lambda name: [c for c in runtime if c.cmd == name]
    assert any("cargo build --release --locked" in c.value[0] for c in builder if c.cmd == "RUN")
    users = get("USER")
    assert users and users[-1].value[0].split(":")[0] not in ("root", "0"), "runs as root"
    assert [c.value for c in get("VOLUME")] == [(SPOOL_DIR,)], "VOLUME is the spool dir"
    assert [c.value for c in get("EXPOSE")] == [(str(LISTEN_PORT), str(ADMIN_PORT))]
    ep = get("ENTRYPOINT")
    assert len(ep) == 1 and ep[0].json and ep[0].value == ("/usr/local/bin/timbridge", "serve"), ep
    copies = [c.value for c in get("COPY")]
    assert ("deploy/config.container.toml", "/etc/timbridge/config.toml") in copies, copies
    assert ("/out/timbridge", "/usr/local/bin/timbridge") in copies and \
        any(c.flags == ("--from=builder",) for c in get("COPY")), copies
    assert ("TIMBRIDGE_CONFIG", "/etc/timbridge/config.toml") in [c.value for c in get("ENV")]
    assert any("ca-certificates" in c.value[0] for c in get("RUN"))
    assert [c.value for c in get("STOPSIGNAL")] == [("SIGTERM",)]
    cmd = healthcheck_command()
    assert f"/dev/tcp/127.0.0.1/{ADMIN_PORT}" in cmd[-1] and "/healthz" in cmd[-1], cmd
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "target/" in ignore and ".git/" in ignore


@check("docker-compose.yml: KRaft Kafka, topic init, timbridge wired to both, Prometheus, Grafana")
def _():
    svc = COMPOSE["services"]
    assert set(svc) >= {"kafka", "kafka-init", "timbridge", "prometheus", "grafana"}, set(svc)
    kafka = svc["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"] and "broker" in env["KAFKA_PROCESS_ROLES"]
    assert "zookeeper" not in json.dumps(env).lower()
    internal = [l.split("://")[1] for l in env["KAFKA_ADVERTISED_LISTENERS"].split(",") if l.startswith("PLAINTEXT://")]
    init = svc["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = "\n".join(init["command"])
    for topic in (CONFIG["kafka"]["group_topic"], CONFIG["kafka"]["c2c_topic"]):
        assert topic in script, f"kafka-init does not create {topic}"
    tb = svc["timbridge"]
    ctx = (DEPLOY / tb["build"]["context"]).resolve()
    assert ctx == ROOT and (ctx / tb["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert tb["environment"]["TIMBRIDGE_BROKERS"] == internal[0]
    # The baked config names no broker: without TIMBRIDGE_BROKERS it must not start.
    assert CONFIG["kafka"]["brokers"] == "", "config.container.toml must leave kafka.brokers empty"
    for var in TOKEN_ENVS:
        assert var in tb["environment"], f"timbridge lacks {var} (token_env)"
    assert tb["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert "./config.container.toml:/etc/timbridge/config.toml:ro" in tb["volumes"]
    assert f"spool:{SPOOL_DIR}" in tb["volumes"]
    # The admin port (/metrics) is published on the host's loopback only.
    assert tb["ports"] == [f"{LISTEN_PORT}:{LISTEN_PORT}", f"127.0.0.1:{ADMIN_PORT}:{ADMIN_PORT}"]
    assert duration_s(tb["stop_grace_period"]) >= MIN_GRACE_S
    prom = svc["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    # every bind mount names a path that exists
    for name, s in svc.items():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"


# --------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------

K8S = DEPLOY / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in K8S.glob("*/kustomization.yaml"))


def overlay_docs(name: str, kustomized: Path | None) -> list[dict]:
    if kustomized is not None:
        return load_yaml_all(kustomized / f"{name}.yaml")
    k = load_yaml(K8S / name / "kustomization.yaml")
    if k.get("patches") or k.get("patchesStrategicMerge"):
        raise Skip("has patches and kubectl (kustomize) is not available")
    docs = []
    for r in k["resources"]:
        p = K8S / name / r
        if p.is_dir():
            docs += overlay_docs(p.name, None)
        else:
            docs += load_yaml_all(p)
    return docs


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def containers_named(doc: dict, name: str) -> list[dict]:
    return [c for c in pod_spec(doc)["containers"] if c["name"] == name]


def check_overlay(name: str, docs: list[dict]) -> None:
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), \
            f"a document without apiVersion/kind/metadata.name: {str(d)[:120]}"
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    workloads = by_kind.get("Deployment", []) + by_kind.get("StatefulSet", [])
    assert workloads, "no workload"
    for w in workloads:
        wname = f"{w['kind']}/{w['metadata']['name']}"
        tlabels = w["spec"]["template"]["metadata"]["labels"]
        assert labels_match(w["spec"]["selector"]["matchLabels"], tlabels), f"{wname}: selector does not match its template"
        spec = pod_spec(w)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace >= MIN_GRACE_S, f"{wname}: terminationGracePeriodSeconds {grace} < drain_delay + shutdown_timeout + {GRACE_MARGIN_S}"
        tbs = containers_named(w, "timbridge")
        assert len(tbs) == 1, f"{wname}: one container named timbridge"
        c = tbs[0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
            pr = c.get(probe)
            assert pr, f"{wname}: no {probe}"
            assert pr["httpGet"]["path"] == path, f"{wname}: {probe} asks {pr['httpGet']['path']}, not {path}"
            port = pr["httpGet"]["port"]
            assert ports.get(port, port) == ADMIN_PORT, f"{wname}: {probe} port {port} is not {ADMIN_PORT} (admin_listen)"
        assert c["args"] == ["--config", "/etc/timbridge/config.toml"], c["args"]
        sc = c.get("securityContext", {})
        assert sc.get("readOnlyRootFilesystem") is True, f"{wname}: readOnlyRootFilesystem"
        assert sc.get("allowPrivilegeEscalation") is False, f"{wname}: allowPrivilegeEscalation"
        assert sc.get("runAsNonRoot") or spec.get("securityContext", {}).get("runAsNonRoot"), f"{wname}: runAsNonRoot"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{wname}: drop ALL capabilities"
        res = c["resources"]
        assert res == TIMBRIDGE_RESOURCES, res
        env = {e["name"]: e for e in c.get("env", [])}
        assert "TIMBRIDGE_BROKERS" in env, f"{wname}: TIMBRIDGE_BROKERS"
        for var in TOKEN_ENVS:
            assert env.get(var, {}).get("valueFrom", {}).get("secretKeyRef"), f"{wname}: {var} not from a Secret"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert SPOOL_DIR in mounts, f"{wname}: nothing mounted at {SPOOL_DIR}"
        assert "/etc/timbridge" in mounts
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        cfg_vol = vols[mounts["/etc/timbridge"]]
        cm_name = cfg_vol["configMap"]["name"]
        cms = [d for d in by_kind.get("ConfigMap", []) if d["metadata"]["name"] == cm_name]
        assert cms, f"{wname}: ConfigMap {cm_name} is not in the overlay"
        if name.startswith("sidecar"):
            check_sidecar_config(cms[0]["data"]["config.toml"], w, by_kind.get("Service", []))
        else:
            assert cms[0]["data"]["config.toml"] == CONFIG_TEXT, \
                f"ConfigMap {cm_name}: config.toml differs from deploy/config.container.toml"
        spool = mounts[SPOOL_DIR]
        if w["kind"] == "StatefulSet":
            vct = [t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])]
            assert spool in vct, f"{wname}: the spool is not a volumeClaimTemplate"
            gov = [s for s in by_kind.get("Service", []) if s["metadata"]["name"] == w["spec"]["serviceName"]]
            assert gov and gov[0]["spec"].get("clusterIP") == "None", f"{wname}: serviceName is not a headless Service here"
        else:
            v = vols[spool]
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names, f"{wname}: PVC {claim} is not in the overlay"
                assert w["spec"]["replicas"] == 1 and w["spec"]["strategy"]["type"] == "Recreate", \
                    f"{wname}: a ReadWriteOnce spool claim needs one replica and Recreate"
            else:
                assert "emptyDir" in v, f"{wname}: spool volume is neither a PVC nor an emptyDir"
    # Services select a workload and name ports it has
    for s in by_kind.get("Service", []):
        sel = s["spec"]["selector"]
        targets = [w for w in workloads if labels_match(sel, w["spec"]["template"]["metadata"]["labels"])]
        assert targets, f"Service/{s['metadata']['name']} selects no workload"
        cports = {p["name"] for w in targets for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            assert isinstance(tp, int) or tp in cports, f"Service/{s['metadata']['name']}: targetPort {tp} unknown"
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"]["matchLabels"]
        svcs = [s for s in by_kind.get("Service", []) if labels_match(sel, s["metadata"].get("labels", {}))]
        assert len(svcs) == 1, f"ServiceMonitor/{sm['metadata']['name']} selects {len(svcs)} Services (want 1: no double scrape)"
        sports = {p["name"] for p in svcs[0]["spec"]["ports"]}
        admin_ports = {p["name"] for p in svcs[0]["spec"]["ports"]
                       if p.get("port") == ADMIN_PORT or p.get("targetPort") in ("admin", ADMIN_PORT)}
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in sports and ep.get("path", "/metrics") == "/metrics", ep
            assert ep["port"] in admin_ports, f"ServiceMonitor scrapes port {ep['port']}, not the admin port {ADMIN_PORT}"
    for pm in by_kind.get("PodMonitor", []):
        sel = pm["spec"]["selector"]["matchLabels"]
        targets = [w for w in workloads if labels_match(sel, w["spec"]["template"]["metadata"]["labels"])]
        assert targets, f"PodMonitor/{pm['metadata']['name']} selects no workload"
        for ep in pm["spec"]["podMetricsEndpoints"]:
            tb_ports = {p["name"]: p["containerPort"] for w in targets for c in containers_named(w, "timbridge") for p in c["ports"]}
            assert ep["port"] in tb_ports and ep.get("path", "/metrics") == "/metrics", ep
            assert tb_ports[ep["port"]] == ADMIN_PORT, f"PodMonitor scrapes port {ep['port']}, not the admin port {ADMIN_PORT}"
        assert "timbridge" in pm["metadata"]["name"], "the PodMonitor's job name must contain 'timbridge' for TimbridgeDown"
    if name == "standalone":
        assert by_kind.get("ServiceMonitor") and by_kind.get("PodDisruptionBudget") and by_kind.get("StatefulSet")
    if name.startswith("sidecar"):
        assert by_kind.get("PodMonitor")
        d = by_kind["Deployment"][0]
        assert len(pod_spec(d)["containers"]) == 2, "sidecar: the app and timbridge in one Pod"


SIDECAR_CONFIG_FILE = K8S / "sidecar" / "configmap.yaml"


def sidecar_config_text() -> str:
    return load_yaml(SIDECAR_CONFIG_FILE)["data"]["config.toml"]


def check_sidecar_config(text: str, deployment: dict, services: list[dict]) -> None:
    """The sidecar sits in front of the app: its config is the container
    config plus [upstream] at the app container, and server.callback_path set
    to the app's path; the Service's callback port lands on timbridge."""
    cfg = tomllib.loads(text)
    up = cfg.pop("upstream", None)
    assert up and up.get("url"), "sidecar: no [upstream] url: timbridge would answer the app's callbacks itself"
    path = cfg["server"].pop("callback_path")
    base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in CONFIG.items()}
    base["server"] = {k: v for k, v in CONFIG["server"].items() if k != "callback_path"}
    assert cfg == base, "sidecar config.toml differs from config.container.toml beyond callback_path and [upstream]"
    m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/.*)", up["url"])
    assert m, f"sidecar: upstream.url {up['url']} is not the app container on 127.0.0.1"
    assert m.group(2) == path, f"sidecar: the app's path {m.group(2)} differs from callback_path {path}"
    app_ports = {p["containerPort"]: p.get("name") for c in pod_spec(deployment)["containers"]
                 if c["name"] != "timbridge" for p in c.get("ports", [])}
    port = int(m.group(1))
    assert port in app_ports, f"sidecar: upstream port {port} is not an app container port {sorted(app_ports)}"
    fronted = [p for s in services for p in s["spec"]["ports"] if p.get("targetPort") == "timbridge"]
    assert fronted, "sidecar: no Service port targets timbridge: Tencent's callbacks would bypass it"
    still_app = [p for s in services for p in s["spec"]["ports"]
                 if p.get("targetPort") in (port, app_ports[port])]
    assert not still_app, f"sidecar: a Service port still reaches the app's callback port directly: {still_app}"
# The one name of the image everywhere in the repository (docker build -t,
# compose, manifests); each kustomization maps it to a registry and tag.
IMAGE_NAME = "timbridge"


def image_refs(text: str) -> list[str]:
    return re.findall(r"^\s*(?:-\s+)?image:\s*['\"]?([^\s'\"#]+)", text, re.M)


def resolved_image(overlay: str) -> str:
    """The timbridge image an overlay deploys, applying the `images:` of its
    bases first, then its own, as kustomize does."""
    k = load_yaml(K8S / overlay / "kustomization.yaml")
    ref = IMAGE_NAME
    for r in k.get("resources", []):
        if (K8S / overlay / r).is_dir():
            ref = resolved_image((K8S / overlay / r).resolve().name)
    name, _, tag = ref.partition(":")
    for entry in k.get("images") or []:
        if entry.get("name") == name:
            name = entry.get("newName", name)
            tag = entry.get("newTag", tag)
    return f"{name}:{tag}" if tag else name


@check("image names: one name (timbridge) in docker build, compose and manifests; kustomize images: everywhere")
def _():
    assert COMPOSE["services"]["timbridge"]["image"] == IMAGE_NAME, COMPOSE["services"]["timbridge"]["image"]
    builds = 0
    for doc in (DEPLOY / "README.md", DEPLOY / "Dockerfile", ROOT / "README.md"):
        for m in re.finditer(r"docker build\b[^\n`]*?\s-t\s+([^\s`]+)", doc.read_text()):
            builds += 1
            assert m.group(1).split(":")[0] == IMAGE_NAME, f"{doc.name}: docker build -t {m.group(1)}"
    assert builds >= 1, "no `docker build -t` command documented"
    for p in sorted(DEPLOY.rglob("*.y*ml")):
        for ref in image_refs(p.read_text()):
            if "timbridge" in ref:
                assert ref == IMAGE_NAME, f"{p.relative_to(DEPLOY)}: image {ref}, expected {IMAGE_NAME} (kustomize sets registry and tag)"
    finals = {}
    for overlay in OVERLAYS:
        k = load_yaml(K8S / overlay / "kustomization.yaml")
        assert k.get("images"), f"kubernetes/{overlay}/kustomization.yaml has no images:"
        finals[overlay] = resolved_image(overlay)
    assert len(set(finals.values())) == 1, f"the overlays deploy different images: {finals}"
    assert next(iter(finals.values())) != IMAGE_NAME, "no kustomization maps the image to a registry"


@check("figures: deploy/ quotes one set of measured figures, the README's latest run")
def _():
    places = [DEPLOY / "README.md", K8S / "standalone" / "statefulset.yaml", K8S / "sidecar" / "timbridge-sidecar.yaml"]
    found = {}
    for p in places:
        text = re.sub(r"\s*#\s*", " ", p.read_text())
        cpu = re.findall(r"([0-9.]+) CPU-s per 1,000 callbacks", text)
        rss = re.findall(r"peak RSS (\d+) MiB at\s+saturation,? (?:and )?(\d+) MiB", re.sub(r"\s+", " ", text))
        assert cpu and rss, f"{p.relative_to(DEPLOY)}: no CPU or RSS figures found"
        found[str(p.relative_to(DEPLOY))] = (cpu[0], rss[0])
    assert len(set(found.values())) == 1, f"different figures: {found}"
    cpu, (sat, drain) = next(iter(found.values()))
    perf = (ROOT / "README.md").read_text()
    m = re.search(r"Drain:.*?peak RSS ([0-9.]+) MiB", perf)
    assert m and round(float(m.group(1))) == int(drain), f"README's drain peak {m and m.group(1)} vs {drain} MiB in deploy/"
    m = re.search(r"\| CPU s per 1k requests, at 2,000/s \| [^|]+\| ([0-9.]+) \|", perf)
    assert m and abs(float(m.group(1)) - float(cpu)) < 0.01, f"README's CPU s per 1k at 2,000/s {m and m.group(1)} vs {cpu} in deploy/"


def register_k8s_checks(kustomized: Path | None) -> None:
    assert OVERLAYS == ["sidecar", "sidecar-pvc", "standalone"], OVERLAYS
    if kustomized is not None:
        @check("kubernetes: kustomize output deploys the mapped timbridge image in every overlay")
        def _():
            for overlay in OVERLAYS:
                want = resolved_image(overlay)
                got = {c["image"] for d in load_yaml_all(kustomized / f"{overlay}.yaml")
                       if d.get("kind") in ("Deployment", "StatefulSet")
                       for c in containers_named(d, "timbridge")}
                assert got == {want}, f"{overlay}: {got} != {want}"
    for name in OVERLAYS:
        check(f"kubernetes/{name}: probes, grace period, security, resources, config, spool, selectors, monitors")(
            lambda name=name: check_overlay(name, overlay_docs(name, kustomized)))

    @check("kubernetes: '# measured: see README Performance' on every timbridge resources block")
    def _():
        blocks = 0
        for p in sorted(K8S.rglob("*.yaml")):
            text = p.read_text()
            for m in re.finditer(r"^(\s+)resources:(.*)$", text, re.M):
                limit = TIMBRIDGE_RESOURCES["limits"]["memory"]
                # The block: the lines after `resources:` indented deeper than it.
                block = []
                for line in text[m.end():].splitlines()[1:]:
                    if line.strip() and len(line) - len(line.lstrip()) <= len(m.group(1)):
                        break
                    block.append(line)
                body = "\n".join(block)
                if "limits:" in body and f"memory: {limit}" in body.split("limits:", 1)[1]:   # timbridge's block
                    blocks += 1
                    assert "# measured: see README Performance" in m.group(2), f"{p.relative_to(DEPLOY)}: {m.group(0).strip()}"
        assert blocks >= 2, f"found {blocks} timbridge resources blocks"

    @check("kubernetes/sidecar: the emptyDir trade-off is explained and a PVC variant exists")
    def _():
        text = (K8S / "sidecar" / "timbridge-sidecar.yaml").read_text()
        assert "emptyDir" in text and "LOST" in text and "sidecar-pvc" in text
        assert (K8S / "sidecar-pvc" / "pvc.yaml").exists()

    @check("kubernetes: the example Secret carries every token_env")
    def _():
        sec = load_yaml(K8S / "standalone" / "secret.example.yaml")
        for var in TOKEN_ENVS:
            assert var in sec["stringData"], var


# --------------------------------------------------------------------------
# systemd
# --------------------------------------------------------------------------

def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "timbridge.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


@check("systemd/timbridge.service: user, state dir = spool, ExecStart, drain timing, restart, hardening")
def _():
    u = unit_settings()
    one = lambda k: (u.get(k) or [None])[-1]
    assert one("User") == "timbridge"
    assert one("StateDirectory") == "timbridge" and SPOOL_DIR.startswith("/var/lib/timbridge/")
    assert one("ExecStart") == "/usr/local/bin/timbridge serve --config /etc/timbridge/config.toml"
    assert one("KillSignal") == "SIGTERM"
    assert duration_s(one("TimeoutStopSec") + ("" if one("TimeoutStopSec")[-1].isalpha() else "s")) >= MIN_GRACE_S
    assert one("Restart") == "on-failure"
    assert one("NoNewPrivileges") == "yes" and one("ProtectSystem") == "strict"
    assert "/var/lib/timbridge" in " ".join(u.get("ReadWritePaths", []))
    assert int(one("LimitNOFILE")) >= 4096 + 1024, "LimitNOFILE must cover server.max_connections (4096) and more"


# --------------------------------------------------------------------------
# The real binary
# --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def register_smoke(binary: Path) -> None:
    token = "deploy-check-token"
    env = dict(os.environ, **{v: token for v in TOKEN_ENVS})
    env.pop("TIMBRIDGE_LISTEN", None)
    env.pop("TIMBRIDGE_BROKERS", None)
    env.pop("TIMBRIDGE_CONFIG", None)

    @check("binary: its shared libraries are all in the runtime image")
    def _():
        if shutil.which("ldd") is None:
            raise Skip("no ldd")
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
        libs = {re.split(r"\.so", l.strip().split()[0])[0].split("/")[-1] for l in out.splitlines() if l.strip()}
        extra = libs - RUNTIME_LIBS
        assert not extra, f"the runtime image lacks {extra}: add their packages to the Dockerfile's runtime stage"
        if libs & {"libssl", "libcrypto"}:
            runtime = (DEPLOY / "Dockerfile").read_text().split("FROM debian:bookworm-slim", 1)[-1]
            assert "libssl3" in runtime, "the binary links OpenSSL: install libssl3 in the runtime stage"

    @check("binary: config.container.toml is refused without TIMBRIDGE_BROKERS, accepted with it")
    def _():
        r = subprocess.run([str(binary), "check-config", "--config", str(CONFIG_FILE)],
                           capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode != 0 and "TIMBRIDGE_BROKERS" in r.stderr, (r.returncode, r.stderr)
        with_brokers = dict(env, TIMBRIDGE_BROKERS="kafka-1:9092,kafka-2:9092")
        r = subprocess.run([str(binary), "check-config", "--config", str(CONFIG_FILE)],
                           capture_output=True, text=True, env=with_brokers, timeout=30)
        assert r.returncode == 0, r.stderr
        assert 'brokers = "kafka-1:9092,kafka-2:9092"' in r.stdout, r.stdout
        assert token not in r.stdout, "check-config printed the token"

    @check("binary: `timbridge check-config` accepts the sidecar's config (with [upstream])")
    def _():
        with tempfile.TemporaryDirectory(prefix="timbridge-deploy-check-") as tmp:
            cfg = Path(tmp) / "config.toml"
            cfg.write_text(sidecar_config_text())
            # The container config leaves the brokers to TIMBRIDGE_BROKERS.
            with_brokers = dict(env, TIMBRIDGE_BROKERS="kafka-1:9092")
            r = subprocess.run([str(binary), "check-config", "--config", str(cfg)],
                               capture_output=True, text=True, env=with_brokers, timeout=30)
            assert r.returncode == 0, r.stderr
            assert "[upstream]" in r.stdout, r.stdout

    @check("binary: serves with config.container.toml; HEALTHCHECK, /readyz, a callback, /metrics, SIGTERM drain")
    def _():
        with tempfile.TemporaryDirectory(prefix="timbridge-deploy-check-") as tmp:
            tmp = Path(tmp)
            cfg = tmp / "config.toml"
            assert f'dir = "{SPOOL_DIR}"' in CONFIG_TEXT
            port, admin_port = free_port(), free_port()
            cfg.write_text(CONFIG_TEXT.replace(f'dir = "{SPOOL_DIR}"', f'dir = "{tmp / "spool"}"')
                           .replace(f'admin_listen = "{ADMIN_LISTEN}"', f'admin_listen = "127.0.0.1:{admin_port}"'))
            callbacks = f"http://127.0.0.1:{port}"
            base = f"http://127.0.0.1:{admin_port}"
            log = open(tmp / "stderr.log", "w+")
            proc = subprocess.Popen([str(binary), "serve", "--config", str(cfg), "--listen", f"127.0.0.1:{port}",
                                     "--brokers", "embedded"], env=env, stdout=log, stderr=log)
            try:
                deadline = time.monotonic() + 60
                while True:
                    assert proc.poll() is None, f"exited {proc.returncode}: {(tmp / 'stderr.log').read_text()[-2000:]}"
                    try:
                        if http_get(base + "/healthz")[0] == 200:
                            break
                    except OSError:
                        pass
                    assert time.monotonic() < deadline, "/healthz not 200 within 60 s"
                    time.sleep(0.2)
                # The Dockerfile's HEALTHCHECK, aimed at this port, and at a closed one.
                hc = healthcheck_command()
                hc_here = hc[:-1] + [hc[-1].replace(f"/127.0.0.1/{ADMIN_PORT}", f"/127.0.0.1/{admin_port}")]
                r = subprocess.run(hc_here, capture_output=True, text=True, timeout=10)
                assert r.returncode == 0, f"HEALTHCHECK failed against a healthy gateway: {r.stderr}"
                closed = free_port()
                hc_closed = hc[:-1] + [hc[-1].replace(f"/127.0.0.1/{ADMIN_PORT}", f"/127.0.0.1/{closed}")]
                # Beside admin_listen the callback port keeps only the static /healthz
                # (for load balancers that health-check the traffic port).
                assert http_get(callbacks + "/healthz")[0] == 200, "the callback port lost /healthz beside admin_listen"
                assert http_get(callbacks + "/readyz")[0] == 404, "the callback port serves /readyz beside admin_listen"
                r = subprocess.run(hc_closed, capture_output=True, text=True, timeout=10)
                assert r.returncode != 0, "HEALTHCHECK passed with nothing listening"
                status, body = http_get(base + "/readyz")
                ready = json.loads(body)
                assert status == 200 and ready["ready"] is True, (status, body)
                assert set(ready) >= READYZ_KEYS, f"/readyz body lacks {READYZ_KEYS - set(ready)}"
                # One signed callback, as Tencent would send it.
                app_id = CONFIG["apps"][0]["sdk_app_id"]
                cb = tmp / "callback.json"
                cb.write_text(json.dumps({
                    "CallbackCommand": "Group.CallbackAfterReadReceipt", "GroupId": "@TGS#deploycheck",
                    "Type": "Public", "EventTime": int(time.time() * 1000),
                    "GroupMsgReceiptList": [{"MsgSeq": 1, "ReadNum": 1, "UnreadNum": 0,
                                             "ReadReceiptMembers": [{"Member_Account": "user0"}]}]}))
                r = subprocess.run([str(binary), "send", "--url", callbacks + CONFIG["server"]["callback_path"],
                                    "--sdkappid", str(app_id), "--token", token, str(cb)],
                                   capture_output=True, text=True, timeout=30, env=env)
                assert r.returncode == 0, f"signed callback not accepted: {r.stdout} {r.stderr}"
                status, body = http_get(base + "/metrics")
                text = body.decode()
                assert status == 200
                live = {base_name(n) for n in re.findall(r"^(timbridge_[a-z0-9_]+)[{ ]", text, re.M)}
                for want in ("timbridge_build_info", "timbridge_kafka_up", "timbridge_spool_max_bytes",
                             "timbridge_spool_oldest_event_age_seconds", "timbridge_dead_letter_total",
                             "timbridge_callback_duration_seconds"):
                    assert want in live, f"/metrics lacks {want}"
                assert re.search(r'timbridge_callbacks_total\{[^}]*outcome="accepted"[^}]*\} 1', text), \
                    "the callback is not counted as accepted"
                assert re.search(rf"^timbridge_spool_max_bytes {CONFIG['spool']['max_bytes']}$", text, re.M)
                live_unknown = live - defined_metrics()
                assert not live_unknown, f"/metrics has names src/metrics.rs does not: {live_unknown}"
                # SIGTERM: unready at once, still up during drain_delay, gone well within the grace period.
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                saw_draining = False
                while proc.poll() is None and time.monotonic() - t0 < MIN_GRACE_S + 10:
                    try:
                        status, body = http_get(base + "/readyz", timeout=1)
                        if status == 503 and json.loads(body).get("draining") is True:
                            saw_draining = True
                    except (OSError, ValueError):
                        pass
                    time.sleep(0.2)
                elapsed = time.monotonic() - t0
                assert proc.poll() is not None, f"still running {elapsed:.1f}s after SIGTERM"
                assert proc.returncode == 0, f"exit code {proc.returncode} after SIGTERM"
                assert saw_draining, "/readyz never answered 503 draining=true after SIGTERM"
                assert DRAIN_S - 0.5 <= elapsed <= DRAIN_S + SHUTDOWN_S + 1, \
                    f"stopped after {elapsed:.1f}s; drain_delay {DRAIN_S}s, shutdown_timeout {SHUTDOWN_S}s"
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()


# --------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", type=Path, help="the timbridge binary to run")
    ap.add_argument("--kustomized", type=Path, help="folder with <overlay>.yaml from kubectl kustomize")
    ap.add_argument("--dashboard-rules", type=Path, help="write the dashboard queries as rules here and exit")
    ap.add_argument("--counts", type=Path, help="write 'passed failed skipped' here")
    args = ap.parse_args()
    if args.dashboard_rules:
        write_dashboard_rules(args.dashboard_rules)
        return 0
    register_k8s_checks(args.kustomized)
    if args.smoke:
        register_smoke(args.smoke)
    else:
        results.append(("skip", "binary: smoke run", "no binary (set TIMBRIDGE_BIN or install cargo)"))
    run_checks()
    for status, name, detail in results:
        print(f"{status:<4} {name}" + (f": {detail}" if status == "skip" else ""))
        if status == "FAIL":
            print("\n".join("       " + l for l in detail.splitlines()))
    if os.environ.get("DEPLOY_CHECK_STRICT") == "1":
        results[:] = [("FAIL", n, f"skipped: {d} (DEPLOY_CHECK_STRICT=1)") if st == "skip" else (st, n, d)
                      for st, n, d in results]
    counts = [sum(1 for r in results if r[0] == s) for s in ("ok", "FAIL", "skip")]
    if args.counts:
        args.counts.write_text(" ".join(map(str, counts)) + "\n")
    return 1 if counts[1] else 0


if __name__ == "__main__":
    sys.exit(main())
