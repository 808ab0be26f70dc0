#!/usr/bin/env bash
# The container images of weft, built from this checkout without pulling
# anything from a registry.
#
#   bash scripts/images.sh [--out DIR]
#
# builds the release binaries (`cargo build --release --bins --locked`, into
# CARGO_TARGET_DIR, default $WEFT_CACHE/target = ~/.cache/weft/target as in
# scripts/test.sh) and assembles two images FROM scratch with buildah:
#
#   ghcr.io/weft-mesh/weft-control-plane:<version>  the control plane, as user 65532:65532
#   ghcr.io/weft-mesh/weft-proxy:<version>          the node proxy, as root (it programs
#                                                   nftables), with Debian's `nft` and `ip`
#
# <version> is each crate's version from `cargo metadata`, and the names are
# the ones deploy/weft.yaml and the Helm chart use. Each image holds its binary
# in /usr/local/bin (the entrypoint; its debug information stripped and kept
# beside the archive as <name>-<version>.debug), the shared libraries `ldd`
# names and the dynamic loader, and nothing else but a few files from /etc (passwd, group,
# nsswitch.conf; for the proxy also protocols, with which `nft` names
# protocols as on the node, and iproute2's name tables). Before committing,
# the script runs every executable of an image in a chroot of its root file
# system (`--version`), and `nft -f` and `ip` in a throwaway network
# namespace, so a missing library or file fails the build, not a node.
#
# Each image is written as an uncompressed docker-archive, which `docker load`,
# `kind load image-archive`, `ctr -n k8s.io images import` and
# `skopeo copy docker-archive:...` read:
#
#   <out>/weft-control-plane-<version>.tar
#   <out>/weft-proxy-<version>.tar
#
# <out> is --out DIR, else $WEFT_IMAGES_DIR, else target/images in the
# checkout. Output contract: stdout gets exactly one line, the absolute path of
# <out>; progress, each archive's path and size, and errors go to stderr. The
# images also stay in buildah's local store under their names (replacing the
# previous build of the same tag), for `buildah push`; WEFT_BUILDAH_STORE=DIR
# keeps that store in DIR instead of the machine's default one.
#
# Needs root (buildah's store, chroot, apt-get); installs buildah, nftables
# and iproute2 with apt-get when they are missing. The images are for the
# architecture of the machine that builds them.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

log() { printf 'images.sh: %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}

usage() {
    echo "usage: $0 [--out DIR]   (or WEFT_IMAGES_DIR=DIR)" >&2
    exit 2
}

out="${WEFT_IMAGES_DIR:-$root/target/images}"
while (($#)); do
    case "$1" in
    --out | -o)
        (($# >= 2)) || usage
        out="$2"
        shift 2
        ;;
    --out=*)
        out="${1#--out=}"
        shift
        ;;
    -h | --help) usage ;;
    *) usage ;;
    esac
done

export WEFT_CACHE="${WEFT_CACHE:-$HOME/.cache/weft}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$WEFT_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

registry=ghcr.io/weft-mesh
# Inside the images: binaries' home and the search path for `nft` and `ip`
# (the proxy runs them by name).
bindir=/usr/local/bin
image_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# --- what the build needs --------------------------------------------------

apt_install() {
    log "installing $*"
    if ! apt-get install -y -qq --no-install-recommends "$@" >&2; then
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "$@" >&2
    fi
}

[[ $(id -u) -eq 0 ]] || die "run as root: buildah's store, chroot and apt-get need it"
command -v cargo >/dev/null || die "missing cargo: install Rust stable (rustup)"
command -v python3 >/dev/null || die "missing python3 (reads cargo metadata)"
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v nft >/dev/null || missing+=(nftables)
command -v ip >/dev/null || missing+=(iproute2)
command -v objcopy >/dev/null || missing+=(binutils)
if ((${#missing[@]})); then
    apt_install "${missing[@]}"
fi
[[ -f /etc/protocols ]] || apt_install netbase

# --- versions and binaries ---------------------------------------------------

# Version, licence, description and repository of the two crates, from cargo
# metadata (the repository from [workspace.package] when a crate does not
# inherit it), as "crate<US>field<US>value" lines.
metadata="$(cargo metadata --format-version 1 --no-deps --locked | python3 -c '
import json, os, sys
meta = json.load(sys.stdin)
workspace = {}
try:
    import tomllib
    with open(os.path.join(meta["workspace_root"], "Cargo.toml"), "rb") as f:
        workspace = tomllib.load(f).get("workspace", {}).get("package", {})
except ImportError:
    pass
packages = {p["name"]: p for p in meta["packages"]}
for name in ("weft-control-plane", "weft-proxy"):
    p = packages[name]
    bins = [t["name"] for t in p["targets"] if "bin" in t["kind"]]
    if name not in bins:
        sys.exit(f"crate {name} has no binary named {name} (it has {bins})")
    fields = {
        "version": p["version"],
        "repository": p.get("repository") or workspace.get("repository") or "",
        "license": p.get("license") or workspace.get("license") or "",
        "description": p.get("description") or "",
    }
    for field, value in fields.items():
        print(name, field, " ".join(str(value).split()), sep="\x1f")
')"
declare -A version repository license description
while IFS=$'\x1f' read -r name field value; do
    case "$field" in
    version) version[$name]="$value" ;;
    repository) repository[$name]="$value" ;;
    license) license[$name]="$value" ;;
    description) description[$name]="$value" ;;
    esac
done <<<"$metadata"

app_version="$(sed -n 's/^appVersion:[[:space:]]*//p' deploy/helm/weft/Chart.yaml | tr -d '"'"'"' ')"
for name in weft-control-plane weft-proxy; do
    if [[ "${version[$name]}" != "$app_version" ]]; then
        log "warning: $name is version ${version[$name]} but the chart's appVersion is $app_version:" \
            "the chart (and deploy/weft.yaml) will not find this image"
    fi
done

# Created time and file times of the images: SOURCE_DATE_EPOCH, else the last
# commit's time, so that rebuilding the same binaries gives the same image.
timestamp="${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || true)}"
revision="$(git -C "$root" rev-parse HEAD 2>/dev/null || true)"
if [[ -n "$revision" ]] && [[ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    revision="$revision-dirty"
fi

log "building the release binaries into $CARGO_TARGET_DIR (cargo build --release --bins --locked)"
cargo build --release --bins --locked >&2
release="$CARGO_TARGET_DIR/release"
# weft-cni runs on the node itself, under the node's container runtime, with
# whatever C library the node has (an older glibc, or none): linked
# statically. An explicit --target keeps build scripts and proc macros (which
# cannot be static) out of RUSTFLAGS; its objects live apart, under
# $CARGO_TARGET_DIR/<host triple>.
host_triple="$(rustc -vV | sed -n 's/^host: //p')"
log "building weft-cni statically linked (--target $host_triple, crt-static)"
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --bin weft-cni --target "$host_triple" >&2
static_cni="$CARGO_TARGET_DIR/$host_triple/release/weft-cni"
if readelf -d "$static_cni" | grep -q NEEDED; then
    die "weft-cni is not statically linked: $(readelf -d "$static_cni" | grep NEEDED)"
fi

# --- assembling a root file system -------------------------------------------

work="$(mktemp -d "${TMPDIR:-/tmp}/weft-images.XXXXXX")"
# WEFT_BUILDAH_STORE: a buildah store of its own (scripts/test.sh keeps one
# under $WEFT_CACHE), instead of the machine's default one.
store=()
if [[ -n "${WEFT_BUILDAH_STORE:-}" ]]; then
    store=(--root "$WEFT_BUILDAH_STORE/root" --runroot "$WEFT_BUILDAH_STORE/run")
fi
container="" # buildah's working container, while there is one
cleanup() {
    if [[ -n "$container" ]]; then
        buildah "${store[@]}" rm "$container" >/dev/null 2>&1 || true
    fi
    rm -rf -- "$work"
}
trap cleanup EXIT

# Copies a file into the root file system $1 at the same path (following
# symlinks: the image holds the file under the name that is asked for).
copy_file() {
    local rootfs="$1" path="$2"
    [[ -e "$rootfs$path" ]] && return
    mkdir -p "$rootfs$(dirname "$path")"
    cp -L --preserve=mode "$path" "$rootfs$path"
}

# Copies the shared libraries an executable needs, and the dynamic loader,
# into the root file system $1, at the paths `ldd` resolves them to.
copy_libraries() {
    local rootfs="$1" executable="$2" line lib
    local ldd_out
    ldd_out="$(ldd "$executable")" || die "ldd $executable failed: is it a dynamic executable?"
    if grep -q 'not found' <<<"$ldd_out"; then
        die "$executable needs libraries this machine lacks:"$'\n'"$ldd_out"
    fi
    while read -r line; do
        case "$line" in
        *' => '/*) lib="${line#* => }" ;; # libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)
        /*) lib="$line" ;;                 # /lib64/ld-linux-x86-64.so.2 (0x...)
        *) continue ;;                     # linux-vdso.so.1 (0x...): the kernel's
        esac
        lib="${lib%% (0x*}"
        copy_file "$rootfs" "$lib"
    done <<<"$ldd_out"
}

# Installs executable $2 as $3 in the root file system $1, with its libraries.
install_executable() {
    local rootfs="$1" source="$2" target="$3"
    [[ -x "$source" ]] || die "missing executable $source"
    mkdir -p "$rootfs$(dirname "$target")"
    cp -L --preserve=mode "$source" "$rootfs$target"
    copy_libraries "$rootfs" "$source"
}

# The /etc of every image: users for numeric IDs, and name lookups from files
# first (glibc's defaults put DNS before /etc/hosts).
write_etc() {
    local rootfs="$1"
    mkdir -p "$rootfs/etc" "$rootfs/tmp"
    chmod 1777 "$rootfs/tmp"
    cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
    cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
    printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
}

# Runs a check quietly: what it printed is shown only when it fails, which
# fails the build.
check() {
    local output
    output="$("$@" 2>&1)" || die "image check failed: \`$*\`:"$'\n'"$output"
}

# Runs the image's own programs against its root file system: a library or
# data file missing from it fails here.
smoke_test() {
    local rootfs="$1" executable
    shift
    for executable in "$@"; do
        check chroot "$rootfs" "$executable" --version
    done
}

# `nft -f` and `ip` as the proxy runs them (a table with a set and a
# prerouting chain; a policy rule and a local route in one `ip -batch`; the
# rule listed back as JSON), inside the proxy image's root file system, in a
# network namespace of their own that disappears with them. The rules use only
# nf_tables' core expressions: the kernel modules behind tproxy, socket and fib
# are the node's business, not the image's.
smoke_test_capture_tools() {
    local rootfs="$1"
    if ! unshare --net true 2>/dev/null; then
        log "warning: cannot create a network namespace here: nft and ip checked with --version only"
        return
    fi
    # shellcheck disable=SC2016 # $1 is the inner shell's argument
    local script='
set -e
chroot "$1" /usr/sbin/nft -f - <<EOF
table inet weft_image_check {
	set meshed_v4 {
		type ipv4_addr
	}
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto != tcp accept
		meta mark & 0x2 == 0x2 accept
		ip daddr @meshed_v4 tcp dport 15008 meta mark set meta mark | 0x1 accept
		ip daddr @meshed_v4 meta l4proto tcp drop
	}
}
add element inet weft_image_check meshed_v4 { 10.244.0.2 }
EOF
chroot "$1" /usr/sbin/nft list table inet weft_image_check | grep -q "meta l4proto != tcp"
chroot "$1" /usr/sbin/ip -4 -batch - <<EOF
rule add fwmark 0x1/0x1 table 100
route add local 0.0.0.0/0 dev lo table 100
EOF
chroot "$1" /usr/sbin/ip -j -4 rule list fwmark 0x1/0x1 table 100 | grep -q "\"table\":\"100\""
'
    check unshare --net /bin/sh -c "$script" sh "$rootfs"
}

# --- images ----------------------------------------------------------------

mkdir -p "$out"
out="$(cd "$out" && pwd)"

# Builds image $1 (a crate and binary name) from the root file system $2 with
# user $3, and writes its archive.
commit_image() {
    local name="$1" rootfs="$2" user="$3"
    local v="${version[$name]}"
    local image="$registry/$name:$v"
    local archive="$out/$name-$v.tar"

    container="$(buildah "${store[@]}" from scratch)"
    buildah "${store[@]}" copy --quiet "$container" "$rootfs" / >/dev/null
    local labels=() label
    for label in \
        "title=$name" \
        "version=$v" \
        "source=${repository[$name]}" \
        "revision=$revision" \
        "description=${description[$name]}" \
        "licenses=${license[$name]}"; do
        [[ -n "${label#*=}" ]] && labels+=(--label "org.opencontainers.image.$label")
    done
    buildah "${store[@]}" config \
        --entrypoint "[\"$bindir/$name\"]" \
        --cmd '' \
        --user "$user" \
        --workingdir / \
        --env "PATH=$image_path" \
        "${labels[@]}" \
        --created-by "scripts/images.sh" \
        "$container"

    local previous=""
    previous="$(buildah "${store[@]}" inspect --type image --format '{{.FromImageID}}' "$image" 2>/dev/null || true)"
    local commit=(--identity-label=false --quiet)
    [[ -n "$timestamp" ]] && commit+=(--timestamp "$timestamp")
    local id
    id="$(buildah "${store[@]}" commit "${commit[@]}" "$container" "$image")"
    buildah "${store[@]}" rm "$container" >/dev/null
    container=""
    # The previous build of this tag, now nameless: keep the store bounded.
    if [[ -n "$previous" && "$previous" != "$id" ]]; then
        buildah "${store[@]}" rmi "$previous" >/dev/null 2>&1 || true
    fi

    rm -f -- "$archive"
    buildah "${store[@]}" push --quiet "$image" "docker-archive:$archive:$image" >&2
    log "$image -> $archive ($(du -h "$archive" | cut -f1), $(stat -c %s "$archive") bytes)"
}

# Installs weft binary $2 in the root file system $1 without its debug
# information (the release profile's line tables: three quarters of the
# binary). The symbols stay, so a backtrace still names its functions; the
# line tables go to <out>/<name>-<version>.debug, which the binary names
# (a GNU debuglink) for gdb or addr2line to find.
install_weft_binary() {
    local rootfs="$1" name="$2"
    local debug="$out/$name-${version[$name]}.debug"
    install_executable "$rootfs" "$release/$name" "$bindir/$name"
    objcopy --only-keep-debug "$release/$name" "$debug"
    objcopy --strip-debug --add-gnu-debuglink="$debug" "$rootfs$bindir/$name"
}

# The control plane.
rootfs="$work/control-plane"
write_etc "$rootfs"
install_weft_binary "$rootfs" weft-control-plane
smoke_test "$rootfs" "$bindir/weft-control-plane"
commit_image weft-control-plane "$rootfs" 65532:65532

# The node proxy, with the tools it runs to program capture.
rootfs="$work/proxy"
write_etc "$rootfs"
install_weft_binary "$rootfs" weft-proxy
# weft's CNI plugin, which the proxy copies onto the node (beside it, so
# that it finds it); it runs on the node, outside this image.
install -D -m 0755 "$static_cni" "$rootfs$bindir/weft-cni"
objcopy --strip-debug "$rootfs$bindir/weft-cni"
# Alone in an empty root: it needs nothing of the image (nor of the node).
alone="$work/weft-cni-alone"
install -D -m 0755 "$rootfs$bindir/weft-cni" "$alone/weft-cni"
check env CNI_COMMAND=VERSION chroot "$alone" /weft-cni </dev/null
rm -rf "$alone"
install_executable "$rootfs" "$(command -v nft)" /usr/sbin/nft
install_executable "$rootfs" "$(command -v ip)" /usr/sbin/ip
copy_file "$rootfs" /etc/protocols
# iproute2's tables of names (routing tables, protocols, scopes), so that
# `ip` prints and parses names as it does on the node.
if [[ -d /etc/iproute2 ]]; then
    cp -rL --preserve=mode /etc/iproute2 "$rootfs/etc/"
fi
smoke_test "$rootfs" "$bindir/weft-proxy" /usr/sbin/nft
check chroot "$rootfs" /usr/sbin/ip -V
smoke_test_capture_tools "$rootfs"
commit_image weft-proxy "$rootfs" 0:0

printf '%s\n' "$out"
