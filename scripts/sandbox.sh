#!/usr/bin/env bash
# The README's main command: builds weft, starts a sandbox cluster in network
# namespaces on this machine (control plane on the embedded local-manifests
# default, a node proxy per node) and prints what the mesh costs: direct vs a
# plain relay vs weft. Arguments go to weft-bench (try --help). Needs root.
set -euo pipefail
# Output files (--json, --chart) are relative to where the command was run.
caller="$PWD"
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "the sandbox builds network namespaces: run as root (sudo bash scripts/sandbox.sh)" >&2
    exit 1
fi
# The testbed uses iproute2; the node proxies program nftables.
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
if ((${#missing[@]})); then
    echo "installing ${missing[*]}"
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi

cargo build --release --bins --locked
bench="$(realpath "${CARGO_TARGET_DIR:-target}")/release/weft-bench"
cd "$caller"
exec "$bench" "$@"
