#!/usr/bin/env bash
# A real kube-apiserver (and etcd) for weft's integration tests.
#
#   bash scripts/apiserver.sh build
#
# installs Debian's etcd-server when `etcd` is missing, builds the kube-apiserver
# of tests/apiserver/ (the upstream one, from the Kubernetes Go modules) and
# prints the binary's path on stdout; everything else goes to stderr. The binary
# is cached under $WEFT_CACHE/apiserver, named by a hash of the Go module, so
# only a change to tests/apiserver/ rebuilds it; Go's module and build caches
# live under $WEFT_CACHE/go so that a fresh checkout reuses them.
# tests/src/apiserver.rs runs this when WEFT_KUBE_APISERVER is not set.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
module="$root/tests/apiserver"
cache="${WEFT_CACHE:-$HOME/.cache/weft}"

log() { printf 'apiserver.sh: %s\n' "$*" >&2; }
# shellcheck source=lib/go.sh
source "$root/scripts/lib/go.sh"

install_etcd() {
    command -v etcd >/dev/null && return
    log "installing etcd-server"
    if ! apt-get install -y -qq --no-install-recommends etcd-server >&2; then
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends etcd-server >&2
    fi
    command -v etcd >/dev/null || {
        log "etcd-server installed no etcd binary"
        exit 1
    }
}

build() {
    install_etcd
    ensure_go
    local hash binary
    hash="$(cat "$module/go.mod" "$module/go.sum" "$module/main.go" | sha256sum | cut -c1-16)"
    binary="$cache/apiserver/kube-apiserver-$hash"
    if [[ ! -x "$binary" ]]; then
        log "building $binary (a few minutes when the Go caches are cold)"
        mkdir -p "$cache/apiserver"
        local tmp="$binary.tmp.$$"
        trap 'rm -f "$tmp"' EXIT
        # -modcacherw keeps the module cache deletable, -buildvcs=false keeps git
        # out of the build, GOTOOLCHAIN=local never downloads a Go toolchain
        # (go.mod's go line is the minimum).
        (
            cd "$module"
            export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOFLAGS="-modcacherw -buildvcs=false" \
                GOTOOLCHAIN=local CGO_ENABLED=0
            # Stamp the version (/version, `--version`) as Kubernetes' release builds do.
            local version major minor
            version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"
            IFS=. read -r major minor _ <<<"${version#v}"
            local v=k8s.io/component-base/version
            go build -trimpath -o "$tmp" \
                -ldflags "-s -w -X $v.gitVersion=$version -X $v.gitMajor=$major -X $v.gitMinor=$minor" \
                . >&2
        )
        mv -f "$tmp" "$binary"
        trap - EXIT
    fi
    printf '%s\n' "$binary"
}

case "${1:-}" in
build) build ;;
*)
    echo "usage: $0 build" >&2
    exit 2
    ;;
esac
