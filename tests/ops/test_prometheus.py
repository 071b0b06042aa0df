"""The alert rules and the dashboard, checked by Debian's promtool and a real Prometheus
scraping two real worker replicas on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from dokstamp_sync.demo import samples
from dokstamp_sync.demo.embedded import free_port
from dokstamp_sync.redis_keys import RedisKeys
from test_worker import start_worker, wait_settled, wredis, xadd

__all__ = ["start_worker", "wredis"]  # fixtures, used by name
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
PROMTOOL = shutil.which("promtool") or "promtool"
PROMETHEUS = shutil.which("prometheus") or "prometheus"
needs_prometheus = pytest.mark.skipif(
    not (shutil.which("promtool") and shutil.which("prometheus")) and not os.environ.get("CI"),
    reason="Debian's prometheus is not installed (CI installs it)")


def rule_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def panel_exprs() -> dict[str, str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {f"{p['title']} [{t['refId']}]": t["expr"] for p in panels for t in p["targets"]}


@needs_prometheus
def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    """`promtool check rules` accepts alerts.yml; `promtool test rules` runs a test per alert
    (it fires on given series and stays quiet on others) and they all pass."""
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = yaml.safe_load((RULES.parent / "alerts_test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case["alert_rule_test"]
              if t["exp_alerts"]}
    quiet = {t["alertname"] for case in tests for t in case["alert_rule_test"]
             if not t["exp_alerts"]}
    assert tested == quiet == set(rule_exprs())  # every alert: fires once, quiet once
    run = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=RULES.parent,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def exported_names(port: int) -> set[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


@pytest.fixture
def prometheus(tmp_path):
    """Start a real Prometheus on a free loopback port scraping the given targets every
    second, with the alert rules loaded; killed afterwards."""
    procs = []

    def start(targets: list[str]) -> str:
        port = free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(RULES)],
                  "scrape_configs": [{"job_name": "dokstamp-sync",
                                      "static_configs": [{"targets": targets}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115  # closed with the process
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((proc, log))
        return f"http://127.0.0.1:{port}"

    yield start
    for proc, log in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()


@needs_prometheus
def test_a_real_prometheus_evaluates_every_rule_and_panel_on_two_real_workers(
        prometheus, start_worker, wredis, sessions, sandbox):
    """Two worker replicas serve /metrics on loopback only (the default address); Prometheus
    scrapes both: sum() of their outcome counters equals the fleet's tally (not twice), and
    every alert rule's and dashboard panel's expression runs without error and names only
    metrics the worker exports (three deletes held by the guard give the held gauge samples,
    max() of it is 3, not 6, and the guard's alert fires for them); Prometheus reports every
    loaded rule healthy."""
    ports = [free_port(), free_port()]
    # A guard floor of 0: three student deletes pass the threshold (10 % of at most 4 mapped
    # students) and are held, so the held gauge has samples too.
    workers = [start_worker(concurrency=1, DOKSTAMP_SYNC_METRICS_PORT=str(p),
                            DOKSTAMP_SYNC_GUARD_MIN="0") for p in ports]
    bad = samples.event("student", "S-BAD", {"name": "Rui Sem Data", "email": "rui@x.edu"})
    gone = [samples.event("student", f"S-GONE-{i}", op="delete") for i in range(3)]
    events = [*samples.graduating_class(4), bad, *gone]  # a dead letter and held deletes
    xadd(wredis, events)
    wait_settled(sessions, len(events), proc=workers[0])
    # The fleet's own tally of runs that ended synced (every process adds to one Redis hash):
    # what the replicas' counters must add up to.
    synced = int(wredis.hget(RedisKeys().counters, "events_synced"))
    for proc, port in zip(workers, ports, strict=True):
        listening = [c.laddr for p in [psutil.Process(proc.pid), *psutil.Process(
            proc.pid).children(recursive=True)] for c in p.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert [a.ip for a in listening] == ["127.0.0.1"]
    base = prometheus([f"127.0.0.1:{p}" for p in ports])
    deadline = time.monotonic() + 60
    while True:
        try:
            total = query(base, 'sum(dokstamp_sync_task_outcomes_total{state="synced"})')
            up = query(base, "sum(up)")
            if (up["data"]["result"] and up["data"]["result"][0]["value"][1] == "2"
                    and total["data"]["result"]
                    and float(total["data"]["result"][0]["value"][1]) >= synced):
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, ("Prometheus did not scrape both workers", up,
                                             total)
        time.sleep(0.5)
    time.sleep(2)
    by_replica = query(base, 'dokstamp_sync_task_outcomes_total{state="synced"}')
    assert sorted(float(r["value"][1]) for r in by_replica["data"]["result"]) != [
        synced, synced]  # each replica counts its own runs, not the fleet's
    assert float(query(base, 'sum(dokstamp_sync_task_outcomes_total{state="synced"})')
                 ["data"]["result"][0]["value"][1]) == synced
    held = query(base, "max by (entity) (dokstamp_sync_held_events)")["data"]["result"]
    held_by_kind = {r["metric"]["entity"]: r["value"][1] for r in held}
    assert held_by_kind["student"] == "3"
    assert {v for k, v in held_by_kind.items() if k != "student"} == {"0"}  # 0, not missing
    names = exported_names(ports[0]) | exported_names(ports[1])
    exprs = rule_exprs() | panel_exprs()
    for where, expr in exprs.items():
        answer = query(base, expr)
        assert answer["status"] == "success", (where, answer)
        used = set(re.findall(r"dokstamp_sync_[a-z0-9_]+", expr))
        assert used <= names, (where, used - names)
    with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as answer:
        rules = [r for g in json.loads(answer.read())["data"]["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == set(rule_exprs())
    deadline = time.monotonic() + 10
    while any(r["health"] != "ok" for r in rules) and time.monotonic() < deadline:
        time.sleep(1)
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as answer:
            rules = [r for g in json.loads(answer.read())["data"]["groups"]
                     for r in g["rules"]]
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    deadline = time.monotonic() + 10
    while True:  # the held deletes fire the guard's alert, once, for their kind
        with urllib.request.urlopen(f"{base}/api/v1/alerts", timeout=10) as answer:
            firing = [(a["labels"].get("entity"), a["annotations"]["summary"])
                      for a in json.loads(answer.read())["data"]["alerts"]
                      if a["labels"]["alertname"] == "DokStampSyncChangesHeld"
                      and a["state"] == "firing"]
        if firing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert firing == [("student", "3 student deletes/revokes held by the change guard")]
