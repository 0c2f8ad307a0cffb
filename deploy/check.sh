#!/usr/bin/env bash
# Checks everything in deploy/ that can be checked without a Docker engine or a
# Kubernetes cluster. Exits non-zero if any check fails. Run from anywhere:
#   bash deploy/check.sh
#
# Needs: python3, promtool (Debian package `prometheus`), and the Python
# packages in deploy/requirements-check.txt (installed here with pip when
# missing, unless DEPLOY_CHECK_NO_PIP=1). Uses when present, skips otherwise:
# kubectl (its built-in kustomize), systemd-analyze, `docker compose` or
# docker-compose, cargo (to build the binary for the smoke run; or give one
# with TIMBRIDGE_BIN=path).
# DEPLOY_CHECK_STRICT=1 turns every skip into a failure (for CI once the tools
# are installed).
set -uo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$DEPLOY/.." && pwd)"
cd "$DEPLOY"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/timbridge-deploy-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

passed=0 failed=0 skipped=0

# run NAME CMD...: one check; its output is shown only when it fails.
run() {
    local name="$1"; shift
    local out
    if out="$("$@" 2>&1)"; then
        passed=$((passed + 1)); echo "ok   $name"
    else
        failed=$((failed + 1)); echo "FAIL $name"
        printf '%s\n' "$out" | sed 's/^/       /'
        return 1
    fi
}
skip() {
    if [[ "${DEPLOY_CHECK_STRICT:-0}" == 1 ]]; then
        failed=$((failed + 1)); echo "FAIL $1: $2 (DEPLOY_CHECK_STRICT=1)"
    else
        skipped=$((skipped + 1)); echo "skip $1: $2"
    fi
}
have() { command -v "$1" >/dev/null 2>&1; }
# no_output CMD...: succeeds when CMD succeeds and prints nothing (systemd-analyze
# verify exits 0 on many warnings).
no_output() {
    local out
    out="$("$@" 2>&1)" || { printf '%s\n' "$out"; return 1; }
    [[ -z "$out" ]] || { printf '%s\n' "$out"; return 1; }
}

echo "== tools"
if ! have python3; then echo "FAIL python3 is required"; exit 1; fi
if ! python3 -c 'import yaml, kubernetes_validate, check_jsonschema, dockerfile' 2>/dev/null; then
    if [[ "${DEPLOY_CHECK_NO_PIP:-0}" == 1 ]]; then
        echo "FAIL missing Python packages: pip install -r deploy/requirements-check.txt"; exit 1
    fi
    echo "installing deploy/requirements-check.txt with pip"
    python3 -m pip install --quiet --disable-pip-version-check -r "$DEPLOY/requirements-check.txt" || exit 1
fi
if ! have promtool; then echo "FAIL promtool is required (apt-get install prometheus)"; exit 1; fi
echo "promtool: $(promtool --version 2>&1 | head -1)"

echo "== syntax"
yaml_files=()
while IFS= read -r f; do yaml_files+=("$f"); done < <(find . -type f \( -name '*.yml' -o -name '*.yaml' \) | sort)
run "YAML: ${#yaml_files[@]} files parse (PyYAML)" \
    python3 -c 'import sys, yaml
for p in sys.argv[1:]:
    list(yaml.safe_load_all(open(p)))' "${yaml_files[@]}"
run "JSON: grafana/dashboards/timbridge.json (json.tool)" \
    python3 -m json.tool grafana/dashboards/timbridge.json /dev/null
run "TOML: config.container.toml (tomllib)" \
    python3 -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' config.container.toml
run "shell: check.sh (bash -n)" bash -n check.sh

echo "== Prometheus"
run "promtool check rules prometheus/alerts.yml" promtool check rules prometheus/alerts.yml
run "promtool test rules prometheus/alerts_test.yml" promtool test rules prometheus/alerts_test.yml
run "promtool check config prometheus/prometheus.yml" promtool check config prometheus/prometheus.yml
run "promtool check rules: every dashboard query parses as PromQL" \
    bash -c 'python3 check_deploy.py --dashboard-rules "$1" && promtool check rules "$1"' _ "$WORK/dashboard-rules.yml"

echo "== Docker"
run "check-jsonschema: docker-compose.yml against the Compose Specification" \
    check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
if docker compose version >/dev/null 2>&1; then
    run "docker compose config -q" docker compose -f docker-compose.yml config -q
elif have docker-compose; then
    # Compose v1 (Debian's docker-compose) predates the top-level `name:` key;
    # it checks the rest (interpolation, depends_on conditions, volumes).
    sed '/^name: /d' docker-compose.yml > "$WORK/docker-compose.v1.yml"
    run "docker-compose (v1) config -q, without the top-level name: key" \
        docker-compose --project-directory "$DEPLOY" -f "$WORK/docker-compose.v1.yml" config -q
else
    skip "docker compose config" "no compose plugin or docker-compose here (the schema check above stands in)"
fi

echo "== Kubernetes"
mkdir -p "$WORK/kustomized"
kustomized_arg=()
if have kubectl; then
    kustomize_ok=1
    for overlay in kubernetes/*/; do
        name="$(basename "$overlay")"
        run "kubectl kustomize kubernetes/$name" \
            bash -c 'kubectl kustomize "$1" > "$2"' _ "$overlay" "$WORK/kustomized/$name.yaml" \
            || kustomize_ok=0
    done
    [[ $kustomize_ok == 1 ]] && kustomized_arg=(--kustomized "$WORK/kustomized")
    k8s_files=("$WORK"/kustomized/*.yaml)
else
    skip "kubectl kustomize" "no kubectl: validating the plain files (the sidecar-pvc patch is not applied)"
    k8s_files=()
    while IFS= read -r f; do k8s_files+=("$f"); done < <(find kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
fi
k8s_files+=(kubernetes/standalone/secret.example.yaml)
# Validated against the oldest Kubernetes we expect (1.30: every field used is
# GA there) and the newest schema the package has. ServiceMonitor/PodMonitor
# are CRDs without a bundled schema: check_deploy.py checks them instead.
for version in 1.30 ""; do
    label="${version:-newest}"
    run "kubernetes-validate --strict (Kubernetes $label)" \
        bash -c 'out="$(kubernetes-validate --strict --quiet ${1:+-k "$1"} "${@:2}" 2>&1)"; rc=$?
                 rest="$(printf "%s\n" "$out" | grep -v "Couldn.t find schema for kind \(ServiceMonitor\|PodMonitor\) with api version monitoring.coreos.com/v1")"
                 [[ -n "$rest" ]] && printf "%s\n" "$rest"
                 [[ $rc -eq 0 && -z "$rest" ]]' _ "$version" "${k8s_files[@]}"
done

echo "== systemd"
if have systemd-analyze; then
    # verify wants ExecStart's binary to exist: point it at one that does.
    stand_in="$(command -v true)"
    sed "s#^ExecStart=/usr/local/bin/timbridge #ExecStart=$stand_in #" systemd/timbridge.service > "$WORK/timbridge.service"
    run "systemd-analyze verify systemd/timbridge.service (ExecStart binary stood in)" \
        no_output systemd-analyze verify "$WORK/timbridge.service"
    if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
        # 20 on systemd's 0-100 scale = "2.0 OK" as it prints it.
        run "systemd-analyze security --offline: exposure at most 2.0" \
            systemd-analyze security --offline=true --threshold=20 "$WORK/timbridge.service"
    else
        skip "systemd-analyze security" "this systemd has no --offline"
    fi
else
    skip "systemd-analyze" "not installed (Debian package systemd)"
fi

echo "== cross-file checks and the real binary"
bin_arg=()
if [[ -n "${TIMBRIDGE_BIN:-}" ]]; then
    bin_arg=(--smoke "$TIMBRIDGE_BIN")
elif have cargo; then
    run "cargo build --locked --bin timbridge (the smoke run's binary; --locked as in the Dockerfile)" \
        cargo build --quiet --locked --manifest-path "$ROOT/Cargo.toml" --bin timbridge
    target_dir="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    [[ -x "$target_dir/debug/timbridge" ]] && bin_arg=(--smoke "$target_dir/debug/timbridge")
fi
python3 check_deploy.py "${kustomized_arg[@]}" "${bin_arg[@]}" --counts "$WORK/counts"
py_rc=$?
p=0 f=0 s=0
[[ -s "$WORK/counts" ]] && read -r p f s < "$WORK/counts"
# a crash before the counts were written is a failure too
[[ $py_rc -ne 0 && $f -eq 0 ]] && { echo "FAIL check_deploy.py exited $py_rc"; f=1; }
passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))

echo
echo "deploy: $passed passed, $failed failed, $skipped skipped"
[[ $failed -eq 0 ]]
