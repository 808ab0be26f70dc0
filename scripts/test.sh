#!/usr/bin/env bash
# The whole test suite of weft: formatting, lints, unit and integration tests,
# docs, and a short fuzzing pass. This is the README's test command and what
# CI runs (.ci/run). It installs what it needs; builds are cached outside the
# checkout (WEFT_CACHE, default ~/.cache/weft) so warm runs are fast.
set -euo pipefail
cd "$(dirname "$0")/.."

export WEFT_CACHE="${WEFT_CACHE:-$HOME/.cache/weft}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$WEFT_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$WEFT_CACHE"

step() { printf '\n==> %s\n' "$*"; }

# Keeps the build cache from filling the disk. Every change to a crate
# leaves its old test executables (about 150 MB each with debug info) and
# incremental-compilation directories behind under new hashes; of each
# name, the three newest survive (a crate's lib and bin unit tests share a
# name, and so do two crates' test files of one name), the rest belong to
# builds that will never run again.
prune_stale_builds() {
    local dir
    # (<triple>/release: the statically linked weft-cni of scripts/images.sh)
    for dir in "$CARGO_TARGET_DIR"/{debug,release}/{deps,incremental} \
        "$CARGO_TARGET_DIR"/*-linux-*/release/{deps,incremental}; do
        [[ -d "$dir" ]] || continue
        find "$dir" -mindepth 1 -maxdepth 1 \( -type d -o \( -type f ! -name '*.*' \) \) \
            -printf '%T@ %f\n' |
            sort -rn |
            awk '{ name = $2; sub(/-[0-9a-z]+$/, "", name); if (++seen[name] > 3) print $2 }' |
            while read -r stale; do rm -rf -- "${dir:?}/$stale"; done
    done
    echo "build cache: $(du -sh "$CARGO_TARGET_DIR" 2>/dev/null | cut -f1) in $CARGO_TARGET_DIR"
}

step "toolchain"
for tool in cargo rustfmt cargo-clippy; do
    command -v "$tool" >/dev/null || {
        echo "missing $tool: install Rust stable with rustfmt and clippy (rustup)" >&2
        exit 1
    }
done
cargo --version

step "system packages"
# The testbed builds clusters out of network namespaces with iproute2; the
# proxy programs capture with nftables; a test watches the wire with tcpdump.
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
command -v tcpdump >/dev/null || missing+=(tcpdump)
# The real-cluster tests (tests/tests/real_nodes.rs) run nodes of containerd,
# runc and the standard CNI plugins.
command -v containerd >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
[[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
# The dashboard is tested in a real browser (tests/tests/dashboard.rs).
command -v chromium >/dev/null || missing+=(chromium)
if ((${#missing[@]})); then
    echo "installing ${missing[*]}"
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "the end-to-end tests create network namespaces: run as root" >&2
    exit 1
fi

step "prune stale builds from the cache"
prune_stale_builds

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "kube-apiserver, etcd, helm and promtool for the tests (scripts/apiserver.sh, scripts/helm.sh, scripts/promtool.sh)"
WEFT_KUBE_APISERVER="$(bash scripts/apiserver.sh build)"
export WEFT_KUBE_APISERVER
echo "$WEFT_KUBE_APISERVER"
WEFT_HELM="$(bash scripts/helm.sh path)"
export WEFT_HELM
echo "$WEFT_HELM"
WEFT_PROMTOOL="$(bash scripts/promtool.sh path)"
export WEFT_PROMTOOL
echo "$WEFT_PROMTOOL"

step "Kubernetes node binaries, CoreDNS and test images (scripts/kube.sh)"
WEFT_KUBE_DIR="$(bash scripts/kube.sh build)"
export WEFT_KUBE_DIR
echo "$WEFT_KUBE_DIR"
step "weft's container images (scripts/images.sh: the release build, then the images)"
WEFT_IMAGES_DIR="$(WEFT_BUILDAH_STORE="$WEFT_CACHE/buildah" bash scripts/images.sh)"
export WEFT_IMAGES_DIR
step "cargo test"
cargo test --workspace --locked

step "benchmark smoke run (the README's main command, shortened)"
cargo build --release --bins --locked # built for the images already: instant
"$CARGO_TARGET_DIR/release/weft-bench" --duration 1 --connect-duration 1 --bulk-duration 0.5 \
    --idle-connections 50 --rounds 1 --upgrade-settle 0.5 --json "$WEFT_CACHE/bench-smoke.json" --chart "$WEFT_CACHE/bench-smoke.svg"
python3 - "$WEFT_CACHE/bench-smoke.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
assert report["proxy_is_release_build"], "the benchmark measured a debug proxy"
for scenario in ("request_response", "connection_per_request"):
    for path in report[scenario]["paths"]:
        assert path["requests"] > 0 and path["errors"] == 0, (scenario, path["path"], path)
for path in report["noisy_neighbour"]["paths"]:
    for row in (path["quiet"], path["noisy"]):
        assert row["requests"] > 0 and row["errors"] == 0, ("noisy neighbour", path["path"], row)
upgrade = report["upgrade"]
for kind in upgrade["kinds"]:
    assert kind["requests"] > 0 and kind["failed"] == 0, ("upgrade", kind)
assert upgrade["stream_intact"] and upgrade["old_proxies_exited"], upgrade
print("benchmark smoke: every path answered every request, also through the proxies' upgrade")
PY

step "control-plane scale smoke run (weft-bench control-plane, 10 nodes, 300 pods)"
# The same release build: weft-control-plane sits next to weft-bench.
"$CARGO_TARGET_DIR/release/weft-bench" control-plane --nodes 10 --pods 300 --changes 3 \
    --churn-rate 20 --churn-seconds 1 --report-interval-seconds 2 \
    --json "$WEFT_CACHE/bench-scale-smoke.json"
python3 - "$WEFT_CACHE/bench-scale-smoke.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
assert report["control_plane_is_release_build"], "the scenario measured a debug control plane"
nodes, pods = report["cluster"]["nodes"], report["cluster"]["pods"]
full = report["full_state"]
assert full["nodes"] == nodes, ("not every node got its full state", full)
assert full["workloads_min"] == pods == full["workloads_max"], ("a full state missed pods", full)
changes = report["changes"]
assert changes["count"] == 3, changes
for change in changes["each"]:
    assert change["nodes_reached"] == nodes, ("a change did not reach every node", change)
churn = report["churn"]
assert churn is not None and churn["changes"] == 20, churn
proxy = report["proxy"]
assert proxy["remote_workloads"] + proxy["local_workloads"] == pods, ("the proxy's view", proxy)
assert proxy["deltas"] > 0 and proxy["refused_entries"] == 0, ("the proxy's deltas", proxy)
dashboard = report["dashboard"]
assert dashboard["reports"] == nodes, dashboard
assert all(page["bytes"] > 0 for page in dashboard["pages"]), ("a dashboard page was empty", dashboard)
print(f"control-plane smoke: {nodes} nodes got every pod, every change reached every node, "
      f"the proxy of {proxy['node']} applied {proxy['deltas']} deltas")
PY

step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "fuzz smoke run (FUZZ_SECONDS=${FUZZ_SECONDS:=15} per target)"
FUZZ_SECONDS="$FUZZ_SECONDS" bash scripts/fuzz-smoke.sh

step "all checks passed"
