#!/usr/bin/env bash
# Helm for weft's chart (deploy/helm/weft), without a system-wide install.
#
#   bash scripts/helm.sh render <out.yaml>   # helm template, CRDs included
#   bash scripts/helm.sh lint                # helm lint
#   bash scripts/helm.sh path                # installs helm, prints its path
#
# Helm is built from source with `go install` (through the Go module proxy)
# into $WEFT_CACHE/bin/helm the first time; Go's module and build caches live
# under $WEFT_CACHE/go, shared with scripts/apiserver.sh. A cold build takes a
# few minutes on two cores; later runs start at once. Set WEFT_HELM to use
# another helm binary. Logs go to stderr; `path` prints only the path.
set -euo pipefail

HELM_VERSION=v3.22.0
# The Kubernetes minor version of its client-go (v0.37): what `helm template`
# assumes the cluster runs, as in Helm's release builds.
HELM_K8S_MINOR=37

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${WEFT_CACHE:-$HOME/.cache/weft}"
chart="$root/deploy/helm/weft"

log() { printf 'helm.sh: %s\n' "$*" >&2; }
# shellcheck source=lib/go.sh
source "$root/scripts/lib/go.sh"

# Prints the path of a helm binary of HELM_VERSION, building it if needed.
install_helm() {
    if [[ -n "${WEFT_HELM:-}" ]]; then
        printf '%s\n' "$WEFT_HELM"
        return
    fi
    local bin="$cache/bin"
    local helm="$bin/helm"
    # What was built, so that a change of the pins here rebuilds.
    local stamp="$bin/.helm-build" build="helm $HELM_VERSION k8s 1.$HELM_K8S_MINOR"
    if [[ -x "$helm" && "$(cat "$stamp" 2>/dev/null)" == "$build" ]]; then
        printf '%s\n' "$helm"
        return
    fi
    ensure_go
    log "building helm $HELM_VERSION into $bin (a few minutes when the Go caches are cold)"
    mkdir -p "$bin"
    local start=$SECONDS
    # -modcacherw keeps the module cache deletable; GOTOOLCHAIN=local never
    # downloads a Go toolchain. The -X flags stamp what Helm's Makefile
    # stamps: its version, and the Kubernetes version that `helm template`
    # and `helm lint` assume (1.20 otherwise).
    local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    local pkg
    for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
        ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$HELM_K8S_MINOR"
    done
    GOBIN="$bin" GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOFLAGS=-modcacherw \
        GOTOOLCHAIN=local CGO_ENABLED=0 \
        go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
    printf '%s\n' "$build" >"$stamp"
    log "built helm in $((SECONDS - start)) s"
    printf '%s\n' "$helm"
}

render() {
    local out="${1:?usage: $0 render <out.yaml>}"
    local helm
    helm="$(install_helm)"
    # Written next to the output and renamed, so `out` is whole or absent.
    tmp="$out.tmp.$$"
    trap 'rm -f "$tmp"' EXIT
    "$helm" template weft "$chart" --namespace weft-system --include-crds >"$tmp"
    mv -f "$tmp" "$out"
    trap - EXIT
    log "rendered $chart into $out"
}

case "${1:-}" in
render) render "${2:-}" ;;
lint) "$(install_helm)" lint "$chart" --namespace weft-system ;;
path) install_helm ;;
*)
    echo "usage: $0 render <out.yaml> | lint | path" >&2
    exit 2
    ;;
esac
