#!/usr/bin/env bash
# Smoke-fuzz the weft-certs parsers with cargo-fuzz (libFuzzer): every target
# in fuzz/ runs for FUZZ_SECONDS, starting from a temporary copy of
# fuzz/seeds/<target>/, and the script fails if any target finds a crash.
#
#   scripts/fuzz-smoke.sh                 # all targets
#   scripts/fuzz-smoke.sh spiffe_id       # some targets
#
# Environment:
#   FUZZ_SECONDS    time per target, in seconds (default 20)
#   FUZZ_MAX_LEN    largest input libFuzzer generates, in bytes (default 4096)
#   FUZZ_TIMEOUT    one input running longer than this many seconds fails (default 10)
#   FUZZ_TOOLCHAIN  rustup toolchain to use, e.g. "nightly" (default: the
#                   directory's default toolchain, normally stable)
#   FUZZ_SANITIZER  address (default) | none | ...; passed to cargo fuzz -s
#   WEFT_CACHE      cache root (default ~/.cache/weft); the fuzz build lives
#                   in $WEFT_CACHE/fuzz-target, outside the checkout
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer=..., sanitizer
# coverage passes). On a stable or beta toolchain the script sets
# RUSTC_BOOTSTRAP=1 to allow them. Stable ships the AddressSanitizer runtime
# for x86_64 Linux, so the default sanitizer works there too.
#
# A crashing input is kept in fuzz/artifacts/<target>/ (git-ignored);
# reproduce it with `cargo fuzz run <target> <file>` from the checkout root.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

seconds="${FUZZ_SECONDS:-20}"
max_len="${FUZZ_MAX_LEN:-4096}"
timeout="${FUZZ_TIMEOUT:-10}"
sanitizer="${FUZZ_SANITIZER:-address}"
for pair in "FUZZ_SECONDS=$seconds" "FUZZ_MAX_LEN=$max_len" "FUZZ_TIMEOUT=$timeout"; do
    if ! [[ "${pair#*=}" =~ ^[1-9][0-9]*$ ]]; then
        echo "fuzz-smoke: ${pair%%=*} must be a positive integer, got '${pair#*=}'" >&2
        exit 2
    fi
done

# cargo and rustc, on FUZZ_TOOLCHAIN when it is set.
tc_cargo() { cargo ${FUZZ_TOOLCHAIN:+"+$FUZZ_TOOLCHAIN"} "$@"; }
tc_rustc() { rustc ${FUZZ_TOOLCHAIN:+"+$FUZZ_TOOLCHAIN"} "$@"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: cargo-fuzz not found, installing it into ${CARGO_HOME:-$HOME/.cargo}/bin"
    cargo install --locked cargo-fuzz
fi

rustc_release="$(tc_rustc -vV | sed -n 's/^release: //p')"
if [[ "$rustc_release" == *nightly* || "$rustc_release" == *-dev* ]]; then
    channel_note="nightly rustc $rustc_release"
else
    # cargo-fuzz passes -Z flags to rustc; RUSTC_BOOTSTRAP=1 lets a stable
    # or beta compiler accept them.
    export RUSTC_BOOTSTRAP=1
    channel_note="rustc $rustc_release with RUSTC_BOOTSTRAP=1"
fi

export CARGO_TARGET_DIR="${WEFT_CACHE:-$HOME/.cache/weft}/fuzz-target"
fuzz_args=(--fuzz-dir "$root/fuzz" --sanitizer "$sanitizer")

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    while IFS= read -r target; do
        [[ -n "$target" ]] && targets+=("$target")
    done < <(tc_cargo fuzz list --fuzz-dir "$root/fuzz")
fi
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "fuzz-smoke: no fuzz targets found in fuzz/" >&2
    exit 2
fi

echo "fuzz-smoke: ${channel_note}, sanitizer ${sanitizer}, target dir ${CARGO_TARGET_DIR}"
build_start=$SECONDS
# Build before the clock starts, so FUZZ_SECONDS is all fuzzing. `cargo fuzz
# build` takes one target or none (= all).
if [[ ${#targets[@]} -eq 1 ]]; then
    tc_cargo fuzz build "${fuzz_args[@]}" "${targets[0]}"
else
    tc_cargo fuzz build "${fuzz_args[@]}"
fi
echo "fuzz-smoke: built in $(( SECONDS - build_start ))s; fuzzing ${#targets[@]} target(s) for ${seconds}s each"

work="$(mktemp -d "${TMPDIR:-/tmp}/weft-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

summaries=()
failed=0
for target in "${targets[@]}"; do
    corpus="$work/corpus/$target"
    log="$work/$target.log"
    mkdir -p "$corpus"
    seeds=0
    if [[ -d "fuzz/seeds/$target" ]]; then
        cp -R "fuzz/seeds/$target/." "$corpus/"
        seeds=$(find "$corpus" -type f | wc -l | tr -d ' ')
    fi
    mkdir -p "fuzz/artifacts/$target"

    echo "fuzz-smoke: running $target from $seeds seed(s)"
    status=0
    tc_cargo fuzz run "${fuzz_args[@]}" "$target" "$corpus" -- \
        -max_total_time="$seconds" -max_len="$max_len" -timeout="$timeout" \
        -print_final_stats=1 >"$log" 2>&1 || status=$?

    # libFuzzer's last status line: "#382107 DONE cov: 2803 ft: 3760 corp: 222/50Kb ... exec/s: 34737 ..."
    stats="$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$log" | tail -n 1 || true)"
    runs="$(sed -n 's/^stat::number_of_executed_units:[[:space:]]*//p' "$log" | tail -n 1)"
    execs="$(sed -n 's/^stat::average_exec_per_sec:[[:space:]]*//p' "$log" | tail -n 1)"
    rss="$(sed -n 's/^stat::peak_rss_mb:[[:space:]]*//p' "$log" | tail -n 1)"
    cov="$(sed -En 's/.* cov: ([0-9]+).*/\1/p' <<<"$stats")"
    corp="$(sed -En 's/.* corp: ([0-9]+)\/.*/\1/p' <<<"$stats")"
    figures="${runs:-?} runs, ${execs:-?} exec/s, cov ${cov:-?}, corpus ${corp:-?}, peak rss ${rss:-?} MB"

    if [[ $status -eq 0 ]]; then
        line="PASS  $target: ${figures} in ${seconds}s"
    else
        failed=1
        artifact="$(sed -En 's/.*Test unit written to (.*)$/\1/p' "$log" | tail -n 1)"
        # A Rust panic prints "panicked at <file>:<line>:" and the message
        # on the next line; otherwise take libFuzzer's or a sanitizer's verdict.
        reason="$(grep -m1 -A1 'panicked at' "$log" | tr '\n' ' ' | sed 's/[[:space:]]*$//' || true)"
        if [[ -z "$reason" ]]; then
            reason="$(grep -m1 -E 'ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)' "$log" || echo "exit status $status")"
        fi
        line="FAIL  $target: ${reason}; input ${artifact:-not saved} (${figures})"
        echo "---- last 60 lines of the $target log ----" >&2
        tail -n 60 "$log" >&2
        echo "---- end of $target log ----" >&2
        if [[ -n "$artifact" && -f "$artifact" ]]; then
            echo "crashing input (hex): $(od -An -v -tx1 "$artifact" | tr -d ' \n')" >&2
        fi
    fi
    echo "fuzz-smoke: $line"
    summaries+=("$line")
done

echo
echo "fuzz-smoke summary (${seconds}s per target, ${channel_note}):"
printf '  %s\n' "${summaries[@]}"
exit "$failed"
