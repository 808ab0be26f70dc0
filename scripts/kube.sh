#!/usr/bin/env bash
# The parts of a real Kubernetes cluster besides the API server, for weft's
# tests on real nodes (see scripts/apiserver.sh for the API server and etcd).
#
#   bash scripts/kube.sh build
#
# prints one line on stdout, the path of a directory (everything else goes to
# stderr):
#
#   bin/kubelet bin/kube-proxy bin/kube-controller-manager bin/kube-scheduler
#   bin/kubectl      upstream v1.37.1, built from tests/kubernetes/ (one main
#                    package per binary, copied from k8s.io/kubernetes' cmd/, in
#                    a module with tests/apiserver's require/replace block)
#   bin/coredns      CoreDNS from tests/coredns/ with only the plugins kubernetes,
#                    forward, cache, errors, health, ready, loop, reload,
#                    loadbalance and log (no prometheus: leave it out of Corefiles)
#   images/pause.tar     localhost/weft-test/pause:3.10: the Kubernetes module's
#                        build/pause/linux/pause.c, gcc -static, user 65535
#   images/coredns.tar   localhost/weft-test/coredns:<CoreDNS version, no "v">:
#                        /coredns, the binary above, as the entrypoint
#   images/app.tar       localhost/weft-test/app:1, see below
#   images/refs          "<file> <image name>", one line per archive
#
# The archives are docker-archive files, built FROM scratch with buildah (no
# registry is involved) and meant for `ctr -n k8s.io images import <file>`;
# pods name the images with `imagePullPolicy: Never` or `IfNotPresent`, and
# containerd's CRI `sandbox_image` should be localhost/weft-test/pause:3.10.
# All binaries are static (CGO_ENABLED=0; pause with gcc -static).
#
# The app image is busybox-static's /bin/busybox with all its applets as
# symlinks in /bin (except wget, which segfaults in Debian's build; use nc).
# Its entrypoint /bin/weft-app serves, with busybox httpd on port $PORT (8080)
# from /www, GET / = the pod's hostname and GET /healthz = "ok", and logs each
# request (with the client's address) to stderr. It writes both files into /www
# when it can: in a writable root filesystem, or in an emptyDir mounted at /www.
# With `readOnlyRootFilesystem: true` and no volume it serves the image's own
# /www as it is, whose index.html is a symlink to /etc/hostname, the file the CRI
# mounts with the pod's hostname in every container: the answers are the same.
# /tmp exists (mode 1777) for commands that want it.
#
# The directory is $WEFT_CACHE/kube/<hash>, the hash of everything it is built
# from (this script, the Go modules in tests/kubernetes and tests/coredns, the
# Go version), so a second run prints it at once (it fails, though, when
# tests/kubernetes/go.mod and tests/apiserver/go.mod name a module at different
# versions: both are one Kubernetes release); a build keeps only the 2
# most recently used such directories. Builds hold $WEFT_CACHE/kube/.lock, so
# concurrent runs build once. Go's module and build caches are the ones
# scripts/apiserver.sh uses ($WEFT_CACHE/go); with them warm from the API server
# the Kubernetes binaries take about 7 minutes on 2 busy cores, CoreDNS about 2
# more, the images seconds; a change to this script alone relinks in a minute.
# Buildah runs on a throwaway vfs store inside the build directory (nothing is
# left in /var/lib/containers/storage; buildah itself keeps its small blob-info
# cache in /var/lib/containers/cache). Missing Debian packages (buildah,
# busybox-static, gcc, libc6-dev) are installed with apt-get.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
script="$root/scripts/kube.sh"
kube_module="$root/tests/kubernetes"
dns_module="$root/tests/coredns"
apiserver_module="$root/tests/apiserver"
cache="${WEFT_CACHE:-$HOME/.cache/weft}"
outs="$cache/kube"
keep=2

KUBE_BINARIES=(kubelet kube-proxy kube-controller-manager kube-scheduler kubectl)
PAUSE_IMAGE=localhost/weft-test/pause:3.10
APP_IMAGE=localhost/weft-test/app:1
COREDNS_REPO=localhost/weft-test/coredns

log() { printf 'kube.sh: %s\n' "$*" >&2; }
# shellcheck source=lib/go.sh
source "$root/scripts/lib/go.sh"

# Go's environment for every go command here, as in scripts/apiserver.sh:
# -modcacherw keeps the module cache deletable, -buildvcs=false keeps git out
# of the build, GOTOOLCHAIN=local never downloads a Go toolchain.
go_env() {
    export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOFLAGS="-modcacherw -buildvcs=false" \
        GOTOOLCHAIN=local CGO_ENABLED=0
}

# Installs the Debian packages among "$@" that are not installed.
install_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

# The hash that names the output directory: the relative path and content of
# every input, and the Go version.
inputs_hash() {
    local f
    {
        go env GOVERSION
        while IFS= read -r f; do
            printf '%s\n' "${f#"$root"/}"
            cat "$f"
        done < <(
            printf '%s\n' "$script"
            find "$kube_module" "$dns_module" -type f \( -name go.mod -o -name go.sum -o -name '*.go' \) | LC_ALL=C sort
        )
    } | sha256sum | cut -c1-16
}

# tests/kubernetes must require (and replace) every module that tests/apiserver
# names at the same version: the two are one Kubernetes release.
check_versions() {
    local mismatches
    mismatches="$(awk '
        # "path version" in require blocks, "path => path version" in replace.
        { sub(/\/\/.*/, "") }
        $1 == "require" && NF == 3 { key = "require " $2; ver = $3 }
        $1 == "replace" && NF == 5 { key = "replace " $2; ver = $5 }
        NF == 2 && $2 ~ /^v/ { key = "require " $1; ver = $2 }
        NF == 4 && $2 == "=>" { key = "replace " $1; ver = $4 }
        key == "" { next }
        FNR == NR { want[key] = ver }
        FNR != NR && (key in want) && want[key] != ver {
            printf "  %s: %s here, %s in tests/apiserver\n", key, ver, want[key]
        }
        { key = "" }
    ' "$apiserver_module/go.mod" "$kube_module/go.mod")"
    if [[ -n "$mismatches" ]]; then
        log "tests/kubernetes/go.mod and tests/apiserver/go.mod disagree:"
        printf '%s\n' "$mismatches" >&2
        exit 1
    fi
}

# Removes all but the $keep most recently used output directories, and what
# builds that died left behind. Called with the lock held.
prune() {
    local dir n=0
    rm -rf "$outs"/*.tmp.*
    while IFS= read -r dir; do
        n=$((n + 1))
        if ((n > keep)); then
            log "removing old build $dir"
            rm -rf "$dir"
        fi
    done < <(find "$outs" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended -regex '.*/[0-9a-f]{16}' -printf '%T@ %p\n' |
        sort -rn | cut -d' ' -f2-)
}

build_kubernetes() {
    local out="$1"
    log "building ${KUBE_BINARIES[*]} (minutes when the Go caches are cold)"
    (
        cd "$kube_module"
        go_env
        # Stamp the version (`--version`, /version, client-go's User-Agent) as
        # Kubernetes' release builds do (hack/lib/version.sh).
        local version major minor ldflags="-s -w" pkg
        version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"
        IFS=. read -r major minor _ <<<"${version#v}"
        for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
            ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        done
        local packages=()
        local b
        for b in "${KUBE_BINARIES[@]}"; do packages+=("./$b"); done
        go build -trimpath -ldflags "$ldflags" -o "$out/bin/" "${packages[@]}" >&2
    )
}

build_coredns() {
    local out="$1"
    log "building coredns"
    (
        cd "$dns_module"
        go_env
        # CoreDNS's Makefile stamps the git commit; this build names its origin.
        go build -trimpath -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=weft" \
            -o "$out/bin/coredns" . >&2
    )
}

# The source directory of a module in the module cache, downloading it when
# needed (the Go module's go.sum vouches for it).
module_dir() {
    (
        cd "$1"
        go_env
        go mod download "$2" >&2
        go list -m -f '{{.Dir}}' "$2"
    )
}

# Builds the three images with buildah in a store under $work and writes them
# as docker archives into $out/images. A subshell: its environment stays here.
build_images() (
    local out="$1" work="$2"
    mkdir -p "$out/images" "$work/run" "$work/graph" "$work/tmp"
    # A store of our own, whatever the machine's containers configuration:
    # vfs needs no mounts, and all of it goes away with $work.
    printf '[storage]\ndriver = "vfs"\nrunroot = "%s"\ngraphroot = "%s"\n' \
        "$work/run" "$work/graph" >"$work/storage.conf"
    printf '{"default": [{"type": "insecureAcceptAnything"}]}\n' >"$work/policy.json"
    export CONTAINERS_STORAGE_CONF="$work/storage.conf" TMPDIR="$work/tmp"
    local policy="$work/policy.json"

    # Commits container $1 (configured by the rest of the arguments, buildah
    # config's) as image $2 into archive $3; --timestamp 0 makes the same
    # inputs give the same image.
    commit() {
        local ctr="$1" image="$2" file="$3"
        shift 3
        buildah config "$@" "$ctr" >&2
        buildah commit --quiet --signature-policy "$policy" --timestamp 0 --identity-label=false \
            --rm "$ctr" "$image" >/dev/null
        buildah push --quiet --signature-policy "$policy" "$image" "docker-archive:$out/images/$file:$image" >&2
        printf '%s %s\n' "$file" "$image" >>"$out/images/refs"
    }
    # A layer from directory $1, owned by root.
    layer() {
        tar -C "$1" --owner=0 --group=0 --numeric-owner --sort=name -cf "$1.tar" .
        printf '%s\n' "$1.tar"
    }
    local ctr

    # pause, as build/pause's Makefile compiles it.
    local kube pause_tag
    kube="$(module_dir "$kube_module" k8s.io/kubernetes)"
    pause_tag="$(sed -n 's/^TAG ?= *//p' "$kube/build/pause/Makefile")"
    mkdir -p "$work/pause"
    gcc -Os -Wall -Werror -static -DVERSION="v${pause_tag:-3.10}-weft" -o "$work/pause/pause" \
        "$kube/build/pause/linux/pause.c"
    strip "$work/pause/pause"
    ctr="$(buildah from --signature-policy "$policy" scratch)"
    buildah add --quiet "$ctr" "$(layer "$work/pause")" / >&2
    commit "$ctr" "$PAUSE_IMAGE" pause.tar --user 65535:65535 --entrypoint '["/pause"]'

    # coredns, as CoreDNS's Dockerfile has it (but as root: no capability needed for port 53).
    local dns_version
    dns_version="$(cd "$dns_module" && go_env && go list -m -f '{{.Version}}' github.com/coredns/coredns)"
    mkdir -p "$work/coredns"
    cp "$out/bin/coredns" "$work/coredns/coredns"
    ctr="$(buildah from --signature-policy "$policy" scratch)"
    buildah add --quiet "$ctr" "$(layer "$work/coredns")" / >&2
    commit "$ctr" "$COREDNS_REPO:${dns_version#v}" coredns.tar --entrypoint '["/coredns"]' \
        --port 53/udp --port 53/tcp

    # app: busybox and the entrypoint described at the top.
    local busybox app="$work/app" applet
    busybox="$(dpkg-query -L busybox-static | grep '/bin/busybox$')"
    mkdir -p "$app/bin" "$app/www" "$app/tmp" "$app/etc"
    cp "$busybox" "$app/bin/busybox"
    for applet in $("$busybox" --list); do
        [[ "$applet" == busybox || "$applet" == wget ]] && continue
        ln -s busybox "$app/bin/$applet"
    done
    chmod 1777 "$app/tmp"
    printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$app/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$app/etc/group"
    ln -s /etc/hostname "$app/www/index.html"
    echo ok >"$app/www/healthz"
    cat >"$app/bin/weft-app" <<'EOF'
#!/bin/sh
# weft's test app (scripts/kube.sh): GET / answers the pod's hostname, GET
# /healthz "ok", on port $PORT (8080). Writes both into /www when it can;
# otherwise (read-only root filesystem) serves the image's /www, whose
# index.html is a symlink to /etc/hostname.
if (hostname >/www/.index.html) 2>/dev/null; then
    mv -f /www/.index.html /www/index.html
    echo ok >/www/healthz
else
    echo "weft-app: /www is read-only; serving the image's /www (index.html is /etc/hostname)" >&2
fi
exec httpd -f -v -p "${PORT:-8080}" -h /www
EOF
    chmod 755 "$app/bin/weft-app"
    ctr="$(buildah from --signature-policy "$policy" scratch)"
    buildah add --quiet "$ctr" "$(layer "$app")" / >&2
    commit "$ctr" "$APP_IMAGE" app.tar --entrypoint '["/bin/weft-app"]' \
        --env PATH=/bin --env PORT=8080 --port 8080/tcp --workingdir /
)

build() {
    ensure_go
    check_versions
    local hash dir
    hash="$(go_env && inputs_hash)"
    dir="$outs/$hash"
    if [[ -d "$dir" ]]; then
        touch "$dir"
        printf '%s\n' "$dir"
        return
    fi
    mkdir -p "$outs"
    exec 9>"$outs/.lock"
    if ! flock -n 9; then
        log "waiting for another kube.sh build"
        flock 9
    fi
    if [[ ! -d "$dir" ]]; then
        install_packages buildah busybox-static gcc libc6-dev
        prune
        local start=$SECONDS tmp="$dir.tmp.$$"
        trap 'rm -rf "$tmp"' EXIT
        mkdir -p "$tmp/bin"
        build_kubernetes "$tmp"
        build_coredns "$tmp"
        log "building images"
        build_images "$tmp" "$tmp/work"
        rm -rf "$tmp/work"
        mv "$tmp" "$dir"
        trap - EXIT
        log "built $dir in $((SECONDS - start)) s"
    fi
    touch "$dir"
    prune
    printf '%s\n' "$dir"
}

case "${1:-}" in
build) build ;;
*)
    echo "usage: $0 build" >&2
    exit 2
    ;;
esac
