#!/usr/bin/env bash
# check-layers.sh — vmm-core's rooms and the arrows allowed between them, checked.
#
# vmm-core/src is split into rooms: a folder (or a single file) per concept. A room may use
# the rooms listed after it in ROOMS below and nothing else; the list is the one place the
# layering is written (docs/architecture.md draws it). The check reads every `crate::ROOM`
# path in the code of each file (use lines, grouped `use crate::{a, b}` imports and paths
# inside expressions; comments and string literals are skipped) and every `super::` chain
# that climbs out of its room, and fails on an arrow the table does not allow, on a file in
# a room the table does not name, and on a table that itself holds a circle.
#
# Usage: scripts/check-layers.sh [SRC_DIR]    (default: vmm-core/src)
#        scripts/check-layers.sh --self-test  (adds an upward import to a copy of the tree
#                                              and checks that the check fails on it)
# Exit status: 0 when every arrow is allowed, 1 when not, 2 on a usage error.
set -euo pipefail
cd "$(dirname "$0")/.."

# room: the rooms it may use (top of the house first).
ROOMS='
vmm:        live machine vcpu devices boot host error api persist event_loop config
live:       machine vcpu boot host error persist config
machine:    vcpu devices boot host error persist config
vcpu:       devices error
devices:    error persist config
boot:       error config
host:       error
error:      api persist config
api:        event_loop config
persist:
event_loop:
config:
'
# Crate roots: they declare the rooms (lib.rs) or use the library from outside (main.rs).
ROOTS='lib.rs main.rs'

check() {
  ROOMS="$ROOMS" ROOTS="$ROOTS" python3 - "$1" <<'PY'
import os, re, sys

src = sys.argv[1]
allowed = {}
for line in os.environ["ROOMS"].strip().splitlines():
    room, _, deps = line.partition(":")
    allowed[room.strip()] = deps.split()
roots = set(os.environ["ROOTS"].split())
problems = []

# The table must be a house: every arrow to a declared room, and no circle.
for room, deps in allowed.items():
    for d in deps:
        if d not in allowed:
            problems.append(f"the table: {room} may use {d}, which is not a room")
state = {}
def visit(room, path):
    if state.get(room) == "done":
        return
    if state.get(room) == "open":
        problems.append("the table has a circle: " + " -> ".join(path + [room]))
        return
    state[room] = "open"
    for d in allowed.get(room, []):
        visit(d, path + [room])
    state[room] = "done"
for room in allowed:
    visit(room, [])

def strip(text):
    """The code of a Rust file without comments, string and char literals."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (i and (text[i-1].isalnum() or text[i-1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if end < 0 else end + 1 + len(hashes)
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            out.append('""')
            i += 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i+4] + "    "):
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            out.append("' '")
            i += len(m.group(0)) if m else 1
        else:
            out.append(c)
            i += 1
    return "".join(out)

def grouped(text, start):
    """The first path segment of each item of the `{...}` group opening at `start`."""
    depth, i, item, items = 0, start, "", []
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
            if depth == 1:
                i += 1
                continue
        elif c == "}":
            depth -= 1
            if depth == 0:
                items.append(item)
                break
        if depth == 1 and c == ",":
            items.append(item)
            item = ""
        else:
            item += c
        i += 1
    firsts = []
    for it in items:
        m = re.match(r"\s*(\w+)", it)
        if m:
            firsts.append(m.group(1))
    return firsts

used = set()
files = 0
for dirpath, _, names in os.walk(src):
    for name in sorted(names):
        if not name.endswith(".rs"):
            continue
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, src)
        parts = rel[:-3].split(os.sep)
        if rel in roots:
            continue
        files += 1
        room = parts[0]
        if room not in allowed:
            problems.append(f"{rel}: room {room!r} is not in the table of rooms (scripts/check-layers.sh)")
            continue
        # The module path of the file: a/b.rs is [a, b], a/mod.rs is [a].
        module = parts[:-1] if parts[-1] == "mod" else parts
        code = strip(open(path, encoding="utf-8").read())
        lines = code.split("\n")
        refs = []  # (line number, room used, how)
        for m in re.finditer(r"\bcrate::(\{|\w+)", code):
            line = code.count("\n", 0, m.start()) + 1
            if m.group(1) == "{":
                for first in grouped(code, m.end() - 1):
                    refs.append((line, first, f"crate::{{{first}, ..}}"))
            else:
                refs.append((line, m.group(1), f"crate::{m.group(1)}"))
        for m in re.finditer(r"(?<![\w:])((?:super::)+)(\{|\w+)", code):
            up = m.group(1).count("super::")
            if up < len(module):
                continue  # stays inside the room
            line = code.count("\n", 0, m.start()) + 1
            chain = m.group(1)
            if m.group(2) == "{":
                for first in grouped(code, m.end() - 1):
                    refs.append((line, first, f"{chain}{{{first}, ..}}"))
            else:
                refs.append((line, m.group(2), f"{chain}{m.group(2)}"))
        for line, target, how in refs:
            if target == room or target not in allowed:
                continue  # the room itself, or a name at the crate root (a re-export)
            if target in allowed[room]:
                used.add((room, target))
                continue
            deps = " ".join(allowed[room]) or "nothing"
            problems.append(
                f"{rel}:{line}: {room} -> {target} ({how}) is not an allowed arrow; "
                f"{room} may use: {deps}"
            )

if problems:
    for p in problems:
        print(f"FAIL: {p}")
    sys.exit(1)
total = sum(len(d) for d in allowed.values())
print(f"layers ok: {files} files in {len(allowed)} rooms, {len(used)} arrows used of the {total} allowed, none upward")
PY
}

self_test() {
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  check vmm-core/src >/dev/null || { echo "self-test: the tree itself fails the check"; return 1; }
  # Each mutation adds one upward arrow to a copy of the tree; the check must name it.
  local -a mutations=(
    "devices/mod.rs|use crate::vmm::Vmm;|devices -> vmm"
    "boot/mod.rs|use crate::{config::VmmConfig, machine::Machine};|boot -> machine"
    "machine/mod.rs|fn f() { let _ = crate::live::source::EXIT_GRACE; }|machine -> live"
    "persist/mod.rs|use super::devices::PioBus;|persist -> devices"
  )
  local m file line want out
  for m in "${mutations[@]}"; do
    IFS='|' read -r file line want <<<"$m"
    rm -rf "$tmp/src"
    cp -r vmm-core/src "$tmp/src"
    printf '\n%s\n' "$line" >>"$tmp/src/$file"
    if out=$(check "$tmp/src"); then
      echo "self-test FAILED: '$line' added to $file passed the check"
      return 1
    fi
    grep -q "$want" <<<"$out" || { echo "self-test FAILED: the check did not name $want: $out"; return 1; }
    echo "self-test: '$line' in $file refused: $(grep -m1 "$want" <<<"$out")"
  done
  echo "self-test ok: ${#mutations[@]} upward imports refused"
}

case "${1:-}" in
  --self-test) self_test ;;
  -h|--help) sed -n '2,16p' "$0" ;;
  -*) echo "usage: $0 [SRC_DIR] | --self-test" >&2; exit 2 ;;
  *) check "${1:-vmm-core/src}" ;;
esac
