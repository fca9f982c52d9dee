#!/usr/bin/env bash
# Prints the two sizes of sandrun's root helper that issue 13 bounds (docs/sandrund.md, "Size"):
#
#   1. lines: non-blank, non-comment, non-test source lines that compile into the `sandrund`
#      binary, and separately those of the `sandrun-ipc` crate it links (target: sandrund <= 4,500);
#   2. crates: how many crates the `sandrund` package depends on (target: <= 40).
#
#   packaging/root-size.sh            # both numbers (and ipc's lines), one per line
#   packaging/root-size.sh -v         # also the lines of each file, on stderr
#   packaging/root-size.sh --check    # also exit 1 when a number is over its target
#   packaging/root-size.sh --check-crates  # exit 1 only when the crates are (CI runs this one:
#                                          # the line count is still over its target)
#
# Method, lines. No general tool knows which Rust lines are compiled: tokei and cloc count every
# line of every `.rs` file, tests included. This script walks the module tree as rustc does,
# starting at the binary's roots (sandrund/src/main.rs and the library it calls,
# sandrund/src/lib.rs; ipc/src/lib.rs for ipc) and following `mod name;` to `name.rs`,
# `name/mod.rs` or a `#[path]`. It removes comments (`//`, `///`, `//!`, nested `/* */`) and
# skips every item under `#[cfg(test)]` (a `mod tests { ... }` or `mod tests;` and the file it
# names, a test-only function or `use`), and every item under `#[cfg(feature = "...")]` for a
# feature the sandrund build does not enable (ipc's `tokio`). Files no `mod` reaches (the tests
# crate, fuzz targets) are not counted. Every remaining line with any code on it counts once,
# so a statement wrapped over three lines counts three, as rustfmt lays it out.
#
# Method, crates. `cargo tree -p sandrund -e normal --target <host>`: the crates the package's
# library and binary link on this target (the sandrund package builds only the sandrund binary),
# plus the proc-macro crates they are compiled with (serde_derive, ...: code trusted at build
# time), deduplicated by name and version, sandrund itself not counted, sandrun-ipc counted.
# Build-only dependencies (build scripts' `[build-dependencies]`) and dev-dependencies are not.
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
for arg in "$@"; do
  case "$arg" in
    --check) check=1 ;;
    --check-crates) check=crates ;;
    -v) export ROOT_SIZE_VERBOSE=1 ;;
    *) echo "usage: packaging/root-size.sh [-v] [--check|--check-crates]" >&2; exit 2 ;;
  esac
done
command -v python3 >/dev/null || { echo "root-size.sh: python3 is required" >&2; exit 2; }
command -v cargo >/dev/null || { echo "root-size.sh: cargo is required" >&2; exit 2; }

MAX_LINES=4500
MAX_CRATES=40

count_lines() { # ROOT... -- DISABLED_FEATURE...
  python3 - "$@" <<'PY'
import os, re, sys

args = sys.argv[1:]
sep = args.index("--")
roots, disabled = args[:sep], set(args[sep + 1:])

def strip(src):
    """Comments become spaces; string and char contents lose their brackets and `;` `,` (so
    they cannot confuse the item scanner) but keep their other characters and every newline."""
    out, i, n = [], 0, len(src)
    def lit(s):
        return "".join("_" if c in "{}()[];,#" else c for c in s)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i)); i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j): depth += 1; j += 2
                elif src.startswith("*/", j): depth -= 1; j += 2
                else: j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j])); i = j
        elif re.match(r'(b|c)?r#*"', src[i:i + 260]) and not (i and (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'(b|c)?r(#*)"', src[i:])
            end = '"' + m.group(2)
            j = src.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append(lit(src[i:j])); i = j
        elif c == '"' or (c in "bc" and src.startswith('"', i + 1) and not (i and (src[i - 1].isalnum() or src[i - 1] == "_"))):
            j = i + (1 if c == '"' else 2)
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append(lit(src[i:j + 1])); i = j + 1
        elif c == "'":
            m = re.match(r"'(\\(x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'\n])'", src[i:])
            if m:
                out.append(lit(m.group(0))); i += m.end()
            else:  # a lifetime or a label
                out.append(c); i += 1
        else:
            out.append(c); i += 1
    return "".join(out)

ATTR = re.compile(r"#!?\[")

def item_end(s, i):
    """End (exclusive) of the item starting at i: its `;`/`,` at depth 0, the `}` that closes a
    `{` opened at depth 0, or just before a bracket closing its enclosing block."""
    depth, j, n = 0, i, len(s)
    while j < n:
        c = s[j]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                return j
            depth -= 1
            if depth == 0 and c == "}":
                k = j + 1  # `} else {`, `};`: keep going only for a trailing `;`
                while k < n and s[k] in " \t\n": k += 1
                return k + 1 if k < n and s[k] == ";" else j + 1
        elif c in ";," and depth == 0:
            return j + 1
        j += 1
    return n

def attr_end(s, i):
    j = s.index("[", i)
    depth = 0
    while j < len(s):
        if s[j] == "[": depth += 1
        elif s[j] == "]":
            depth -= 1
            if depth == 0: return j + 1
        j += 1
    return len(s)

def excluded_by(attr):
    body = re.sub(r"\s+", "", attr)
    if re.match(r"#!?\[cfg\((all\()?test[,)]", body):
        return True
    m = re.match(r'#!?\[cfg\(feature="([^"]+)"\)\]', body)
    return bool(m and m.group(1) in disabled)

results = []

def walk(path, modname_dir):
    src = open(path, encoding="utf-8").read()
    s = strip(src)
    keep = [True] * len(s)
    # Inner attribute excluding the whole file.
    for m in re.finditer(r"#!\[", s):
        if excluded_by(s[m.start():attr_end(s, m.start())]):
            return
    children = []
    i = 0
    while True:
        m = ATTR.search(s, i)
        if not m: break
        start = m.start()
        end = attr_end(s, start)
        if s[start + 1] != "!" and excluded_by(s[start:end]):
            j = end
            while True:  # further attributes belong to the same item
                k = j
                while k < len(s) and s[k] in " \t\n": k += 1
                if s.startswith("#[", k): j = attr_end(s, k)
                else: break
            stop = item_end(s, j)
            for k in range(start, stop): keep[k] = False
            i = stop
        else:
            i = end
    kept = "".join(c if keep[k] or c == "\n" else " " for k, c in enumerate(s))
    for m in re.finditer(r'((?:#\[[^\]]*\]\s*)*)(?:pub(?:\([^)]*\))?\s+)?mod\s+([A-Za-z_][A-Za-z0-9_]*)\s*;', kept):
        attrs, name = m.group(1), m.group(2)
        pm = re.search(r'#\[path\s*=\s*"([^"]+)"\]', src[m.start():m.start() + len(attrs)])
        if pm:
            child = os.path.join(os.path.dirname(path), pm.group(1))
        else:
            a = os.path.join(modname_dir, name + ".rs")
            b = os.path.join(modname_dir, name, "mod.rs")
            child = a if os.path.exists(a) else b
        children.append(child)
    lines = sum(1 for line in kept.split("\n") if line.strip())
    results.append((path, lines))
    for child in children:
        base = os.path.basename(child)
        if base == "mod.rs":
            walk(child, os.path.dirname(child))
        else:
            walk(child, os.path.join(os.path.dirname(child), base[:-3]))

for root in roots:
    walk(root, os.path.dirname(root))
total = 0
for path, lines in results:
    if os.environ.get("ROOT_SIZE_VERBOSE"):
        print(f"  {lines:6d}  {path}", file=sys.stderr)
    total += lines
print(total)
PY
}

[ -n "${ROOT_SIZE_VERBOSE:-}" ] && echo "sandrund binary, per file:" >&2
sandrund_lines=$(count_lines sandrund/src/main.rs sandrund/src/lib.rs -- tokio)
[ -n "${ROOT_SIZE_VERBOSE:-}" ] && echo "sandrun-ipc as sandrund links it, per file:" >&2
ipc_lines=$(count_lines ipc/src/lib.rs -- tokio)
host=$(rustc -vV | sed -n 's/^host: //p')
crates=$(cargo tree --locked -p sandrund -e normal --target "$host" --prefix none 2>/dev/null \
  | sed 's/ (\*)$//; s/ (proc-macro)$//' | awk '{print $1, $2}' | sort -u | grep -vc '^sandrund ' || true)
[ -n "$crates" ] && [ "$crates" -gt 0 ] || { echo "root-size.sh: cargo tree failed" >&2; exit 2; }

echo "sandrund lines: $sandrund_lines (target <= $MAX_LINES)"
echo "sandrun-ipc lines: $ipc_lines (counted separately)"
echo "sandrund crates: $crates (target <= $MAX_CRATES)"
if [ "$check" = 1 ] && { [ "$sandrund_lines" -gt "$MAX_LINES" ] || [ "$crates" -gt "$MAX_CRATES" ]; }; then
  echo "root-size.sh: over target" >&2
  exit 1
fi
if [ "$check" = crates ] && [ "$crates" -gt "$MAX_CRATES" ]; then
  echo "root-size.sh: the root helper depends on $crates crates, more than $MAX_CRATES" >&2
  exit 1
fi
