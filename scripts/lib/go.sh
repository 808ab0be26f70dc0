# Sourced by scripts that build Go programs (apiserver.sh, helm.sh).
#
# ensure_go: puts a Go toolchain of at least $WEFT_GO_VERSION on PATH. The
# machine's `go` is used when it is new enough; otherwise the official
# toolchain is fetched from the Go module proxy (golang.org/toolchain, the same
# archive `GOTOOLCHAIN` downloads) into $WEFT_CACHE/go-toolchain, so a machine
# without Go, or with Debian's older one, still builds.

WEFT_GO_VERSION="${WEFT_GO_VERSION:-1.26.8}"

_go_new_enough() {
    local have
    have="$(go env GOVERSION 2>/dev/null)" || return 1
    have="${have#go}"
    [[ "$(printf '%s\n%s\n' "$WEFT_GO_VERSION" "$have" | sort -V | head -n1)" == "$WEFT_GO_VERSION" ]]
}

ensure_go() {
    if command -v go >/dev/null && _go_new_enough; then
        return
    fi
    local cache="${WEFT_CACHE:-$HOME/.cache/weft}"
    local arch
    case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *)
        echo "go.sh: no Go toolchain for $(uname -m)" >&2
        exit 1
        ;;
    esac
    local version="v0.0.1-go$WEFT_GO_VERSION.linux-$arch"
    local dir="$cache/go-toolchain/golang.org/toolchain@$version"
    if [[ ! -x "$dir/bin/go" ]]; then
        command -v unzip >/dev/null || apt-get install -y -qq --no-install-recommends unzip >&2 ||
            { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends unzip >&2; }
        local proxy="${GOPROXY:-https://proxy.golang.org}"
        proxy="${proxy%%,*}"
        echo "go.sh: fetching Go $WEFT_GO_VERSION from $proxy" >&2
        mkdir -p "$cache/go-toolchain"
        local zip="$cache/go-toolchain/$version.zip.$$"
        curl -fsSL -o "$zip" "$proxy/golang.org/toolchain/@v/$version.zip"
        unzip -q -o "$zip" -d "$cache/go-toolchain"
        rm -f "$zip"
        chmod +x "$dir/bin/"* "$dir/pkg/tool/"*/* 2>/dev/null || true
    fi
    export PATH="$dir/bin:$PATH" GOROOT="$dir"
}
