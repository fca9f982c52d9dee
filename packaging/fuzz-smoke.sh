#!/usr/bin/env bash
# A bounded smoke run of every fuzz target (ipc and gateway), for CI.
#
# Builds each cargo-fuzz project once with nightly, then runs each target for FUZZ_SECONDS
# (default 10) starting from its checked-in seeds. New inputs go to <project>/work/corpus/<target>
# and crashes to <project>/artifacts/<target>; both are gitignored. Exits non-zero if any target
# crashes, hangs (-timeout), runs out of memory or fails to build.
#
#   packaging/fuzz-smoke.sh                  # every target, 10 s each
#   FUZZ_SECONDS=600 packaging/fuzz-smoke.sh # a longer campaign
#   packaging/fuzz-smoke.sh manifest legacy  # only these targets
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_PER_TARGET=${FUZZ_SECONDS:-10}
# project directory : targets
PROJECTS=(
    "ipc/fuzz:decode_frame output_pattern"
    "sandrun-gateway/fuzz:multipart multipart_any_type archive_targz archive_zip legacy manifest"
)

log() { printf 'fuzz-smoke: %s\n' "$*" >&2; }

ensure_tools() {
    export PATH="$HOME/.cargo/bin:$PATH"
    if ! rustup toolchain list | grep -q '^nightly'; then
        log "installing the nightly toolchain"
        rustup toolchain install nightly --profile minimal
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        log "installing cargo-fuzz"
        cargo install cargo-fuzz --locked
    fi
}

wanted() {
    local target=$1
    shift
    [ $# -eq 0 ] && return 0
    local w
    for w in "$@"; do [ "$w" = "$target" ] && return 0; done
    return 1
}

# run_target DIR TARGET: one bounded run; prints "TARGET executions" on success.
run_target() {
    local dir=$1 target=$2 log_file
    log_file=$(mktemp)
    mkdir -p "$dir/work/corpus/$target"
    if (cd "$dir" && cargo +nightly fuzz run -O "$target" "work/corpus/$target" "corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1) >"$log_file" 2>&1; then
        local execs
        execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log_file" | grep -o '[0-9]*$' || echo '?')
        printf '%-20s ok      %10s executions\n' "$target" "$execs"
        rm -f "$log_file"
        return 0
    fi
    printf '%-20s FAILED  (log below)\n' "$target"
    tail -n 40 "$log_file" >&2
    rm -f "$log_file"
    return 1
}

main() {
    ensure_tools
    local start=$SECONDS failed=0 entry dir target
    for entry in "${PROJECTS[@]}"; do
        dir="$ROOT/${entry%%:*}"
        log "building ${entry%%:*}"
        if ! (cd "$dir" && cargo +nightly fuzz build -O); then
            log "build of ${entry%%:*} failed"
            failed=1
            continue
        fi
        for target in ${entry#*:}; do
            wanted "$target" "$@" || continue
            run_target "$dir" "$target" || failed=1
        done
    done
    log "done in $((SECONDS - start)) s (${SECONDS_PER_TARGET} s per target)"
    return "$failed"
}

main "$@"
