"""A real Prometheus server scrapes the gateway: the target is up and the
gateway's own series are stored, so the exposition is what Prometheus reads,
not just what a linter accepts."""

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest

import helpers
from conftest import free_port


def query(port: int, promql: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.load(resp)["data"]["result"]
    except OSError:
        return []


def test_prometheus_scrapes_the_gateway(gateway, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not on PATH (CI installs it: apt-get install prometheus)")
    helpers.assert_ok(helpers.post_signed(gateway.port, helpers.group_receipt_body("@TGS#PROM")))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: timbridge\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{gateway.port}']\n"
    )
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    prom = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        up = helpers.wait_until(
            lambda: [r for r in query(port, 'up{job="timbridge"}') if r["value"][1] == "1"],
            timeout=60,
            what="Prometheus to scrape the gateway with up == 1",
        )
        assert up
        accepted = helpers.wait_until(
            lambda: query(
                port,
                'timbridge_callbacks_total{job="timbridge",command="Group.CallbackAfterReadReceipt",outcome="accepted"}',
            ),
            timeout=30,
            what="the gateway's callback counter in Prometheus",
        )
        assert accepted[0]["value"][1] == "1"
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prom.kill()
        log.close()
