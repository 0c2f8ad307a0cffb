"""GET /metrics serves Prometheus text that promtool accepts, with the
callback counter in it."""

import shutil
import subprocess

import pytest

import helpers


def test_metrics_endpoint(gateway, tmp_path):
    # Count something first: a labelled counter has no sample until it is used.
    body = helpers.group_receipt_body("@TGS#2METRICS")
    helpers.assert_ok(helpers.post_signed(gateway.port, body))

    answer = helpers.http_request(gateway.port, "GET", "/metrics")
    assert answer.status == 200, answer
    assert (answer.content_type or "").startswith("text/plain"), answer.content_type
    text = answer.body.decode("utf-8")
    samples = [line for line in text.splitlines() if line.startswith("timbridge_callbacks_total")]
    assert samples, f"no timbridge_callbacks_total sample in /metrics:\n{text[:3000]}"

    if shutil.which("promtool") is None:
        pytest.skip("promtool not on PATH (CI installs it: apt-get install prometheus)")
    done = subprocess.run(["promtool", "check", "metrics"], input=answer.body, capture_output=True, timeout=30)
    problems = (done.stdout + done.stderr).decode(errors="replace").strip()
    assert done.returncode == 0 and not problems, f"promtool check metrics (exit {done.returncode}):\n{problems}"
