#!/usr/bin/env bash
# promtool, Prometheus' rule checker, for the test of the shipped alert
# rules (tests/tests/dashboard.rs), without installing Prometheus: Debian's
# `prometheus` package is downloaded (apt-get download, 19 MB) and only its
# promtool is unpacked into $WEFT_CACHE/bin, once.
#
#   bash scripts/promtool.sh path    # prints the path of promtool
#
# Set WEFT_PROMTOOL to use another promtool. Logs go to stderr.
set -euo pipefail

cache="${WEFT_CACHE:-$HOME/.cache/weft}"

log() { printf 'promtool.sh: %s\n' "$*" >&2; }

if [[ "${1:-}" != path ]]; then
    echo "usage: $0 path" >&2
    exit 2
fi
if [[ -n "${WEFT_PROMTOOL:-}" ]]; then
    printf '%s\n' "$WEFT_PROMTOOL"
    exit 0
fi
promtool="$cache/bin/promtool"
if [[ ! -x "$promtool" ]]; then
    log "unpacking promtool from Debian's prometheus package into $cache/bin"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    # The package lists may be missing on a fresh machine.
    (cd "$work" && apt-get download -qq prometheus >&2) ||
        { apt-get update -qq >&2 && (cd "$work" && apt-get download -qq prometheus >&2); }
    dpkg-deb -x "$work"/prometheus_*.deb "$work/unpacked"
    mkdir -p "$cache/bin"
    install -m 0755 "$work/unpacked/usr/bin/promtool" "$promtool.new"
    mv "$promtool.new" "$promtool"
fi
printf '%s\n' "$promtool"
