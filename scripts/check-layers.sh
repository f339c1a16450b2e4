#!/usr/bin/env bash
# check-layers.sh — vmm-core's rooms and the arrows allowed between them, checked.
#
# vmm-core/src is split into rooms: a folder (or a single file) per concept. A room may use
# the rooms listed after it in ROOMS below and nothing else; the list is the one place the
# layering is written (docs/architecture.md draws it). The check reads every `crate::` path
# in the code of each file (use lines, nested `use crate::{a, b::{c}}` trees, paths inside
# expressions and macros, raw identifiers; comments and string literals are skipped), every
# `super::` chain that climbs out of its room (inline `mod tests` counted), and the names
# lib.rs re-exports at the crate root, and fails on: an arrow the table does not allow; a
# way to hide one (the crate root aliased or globbed, `extern crate self`, a `#[path]` to
# another room's file, a room re-exporting another room's items); a file in a room the
# table does not name; a table that itself holds a circle.
#
# Usage: scripts/check-layers.sh [SRC_DIR]    (default: vmm-core/src)
#        scripts/check-layers.sh --self-test  (adds an upward import to a copy of the tree
#                                              and checks that the check fails on it)
# Exit status: 0 when every arrow is allowed, 1 when not, 2 on a usage error.
set -euo pipefail
cd "$(dirname "$0")/.."

# room: the rooms it may use (top of the house first).
ROOMS='
vmm:        live machine vcpu devices boot host error api persist events event_loop config
live:       machine vcpu boot host error persist events config
machine:    vcpu devices boot host error persist events config
vcpu:       devices error
devices:    error persist config
boot:       error config
host:       error
error:      api persist config
api:        event_loop events config
persist:
events:
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
        elif re.match(r'b?r#*"', text[i:]) and not (i and (text[i-1].isalnum() or text[i-1] == "_")):
            m = re.match(r'(b?r)(#*)"', text[i:])
            hashes = m.group(2)
            start = i + len(m.group(0))
            end = text.find('"' + hashes, start)
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

def tree(code, i):
    """The paths of the use tree (or plain path) starting at code[i], each a list of
    segments, and where it ends. Segments are names, `*`, or `self`."""
    paths, seg = [], []
    n = len(code)
    while i < n:
        m = re.match(r"\s*(\w+|\*|\{)", code[i:])
        if not m:
            break
        tok = m.group(1)
        i += m.end()
        if tok == "{":
            depth_paths = []
            while True:
                sub, i = tree(code, i)
                depth_paths += sub
                m2 = re.match(r"\s*([,}])", code[i:])
                if not m2:
                    return [seg + p for p in depth_paths] or [seg], i
                i += m2.end()
                if m2.group(1) == "}":
                    m3 = re.match(r"\s*,?\s*}", code[i:])
                    break
            return [seg + p for p in depth_paths] or [seg], i
        seg.append(tok)
        m = re.match(r"\s*::\s*", code[i:])
        if not m:
            break
        i += m.end()
    m = re.match(r"\s+as\s+(\w+)", code[i:])
    if m:
        seg = seg + ["as " + m.group(1)]
        i += m.end()
    paths.append(seg)
    return paths, i

def module_of(rel):
    parts = rel[:-3].split(os.sep)
    return parts[:-1] if parts[-1] == "mod" else parts

# Names the crate root gives to rooms' items: lib.rs's `pub use ROOM::..` re-exports and
# `#[macro_export]` macros. `crate::Vmm` is an arrow to the room Vmm comes from.
root_names = {}
lib = os.path.join(src, "lib.rs")
if os.path.exists(lib):
    lib_code = strip(open(lib, encoding="utf-8").read())
    lib_code = re.sub(r"\br#(\w)", r"\1", lib_code)
    for m in re.finditer(r"\bpub\s+use\s+", lib_code):
        for path in tree(lib_code, m.end())[0]:
            if path and path[0] in ("crate", "self"):
                path = path[1:]
            if not path or path[0] not in allowed:
                problems.append(f"lib.rs: `pub use {'::'.join(path)}` re-exports something that is not a room's")
                continue
            last = path[-1][3:] if path[-1].startswith("as ") else path[-1]
            root_names[last] = path[0]
    if re.search(r"\bextern\s+crate\s+self\b", lib_code):
        problems.append("lib.rs: `extern crate self` names the crate root a second way")
for dirpath, _, names in os.walk(src):
    for name in names:
        if name.endswith(".rs"):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, src)
            code = strip(open(path, encoding="utf-8").read())
            for m in re.finditer(r"#\[macro_export\][^\n]*\n\s*macro_rules!\s*(\w+)", code):
                root_names[m.group(1)] = rel.split(os.sep)[0].removesuffix(".rs")

used = set()
files = 0
for dirpath, _, names in os.walk(src):
    for name in sorted(names):
        if not name.endswith(".rs"):
            continue
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, src)
        if rel in roots:
            continue
        files += 1
        room = rel.split(os.sep)[0].removesuffix(".rs")
        if room not in allowed:
            problems.append(f"{rel}: room {room!r} is not in the table of rooms (scripts/check-layers.sh)")
            continue
        module = module_of(rel)
        code = strip(open(path, encoding="utf-8").read())
        # One spelling: raw identifiers as plain ones, `self::super` as `super`.
        code = re.sub(r"\br#(\w)", r"\1", code)
        code = re.sub(r"\bself\s*::\s*(?=super\b)", "", code)
        line_of = lambda pos: code.count("\n", 0, pos) + 1
        # Inline modules (`mod tests { .. }`): a `super` inside one climbs out of it first.
        inline = []
        for m in re.finditer(r"\bmod\s+\w+\s*\{", code):
            depth, j = 0, m.end() - 1
            while j < len(code):
                if code[j] == "{":
                    depth += 1
                elif code[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            inline.append((m.end(), j))
        nested = lambda pos: sum(1 for a, b in inline if a <= pos < b)
        def refuse(pos, why):
            problems.append(f"{rel}:{line_of(pos)}: {why}")
        for m in re.finditer(r"\bextern\s+crate\b", code):
            refuse(m.start(), "`extern crate` inside a room names crates (or the root) a second way")
        # The crate root must be named as `crate::path`: no alias, glob or `self` of it.
        for m in re.finditer(r"(?<![\w$])crate\b", code):
            before = code[max(0, m.start() - 8):m.start()]
            after = code[m.end():m.end() + 40]
            if re.match(r"\s*::", after) or re.search(r"(pub\s*\(|\bin\s+)\s*$", before):
                continue
            refuse(m.start(), "the crate root used as a name (`crate as ..`, `use crate;`): it hides arrows")
        for m in re.finditer(r"#\s*\[\s*path\s*=\s*\"([^\"]*)\"", open(path, encoding="utf-8").read()):
            target = os.path.normpath(os.path.join(dirpath, m.group(1)))
            if os.path.relpath(target, src).split(os.sep)[0].removesuffix(".rs") != room:
                refuse(0, f"#[path = {m.group(1)!r}] takes a file from another room")
        refs = []  # (position, room used, how, re-exported)
        for m in re.finditer(r"(?<![\w])(\$?crate|super)\s*::", code):
            if m.group(1) == "super" and re.search(r"::\s*$", code[max(0, m.start() - 4):m.start()]):
                continue  # the tail of a chain already read
            exported = bool(re.search(r"\bpub\s*(\([^)]*\))?\s*use\s+[^;]*$", code[max(0, m.start() - 200):m.start()]) and
                            code[max(0, m.start() - 200):m.start()].rfind(";") < code[max(0, m.start() - 200):m.start()].rfind("use"))
            for p in tree(code, m.start())[0]:
                segs = [x for x in p if not x.startswith("as ")]
                if segs and segs[0] == "$crate":
                    segs[0] = "crate"
                if not segs:
                    continue
                if segs[0] == "crate":
                    rest = segs[1:]
                else:
                    up = 0
                    while up < len(segs) and segs[up] == "super":
                        up += 1
                    if up < len(module) + nested(m.start()):
                        continue  # stays inside the room
                    rest = segs[up:]
                if not rest:
                    continue
                first = rest[0]
                if first in ("*", "self"):
                    refuse(m.start(), f"`{'::'.join(segs)}` globs or re-binds the crate root: it hides arrows")
                    continue
                target = first if first in allowed else root_names.get(first.rstrip("!"))
                if target is None:
                    continue  # not a room's name
                refs.append((m.start(), target, "::".join(segs), exported))
        for pos, target, how, exported in refs:
            if target == room:
                continue
            if exported:
                refuse(pos, f"{room} re-exports {target}'s `{how}`: a room offers only its own items, or the arrow is laundered")
                continue
            if target in allowed[room]:
                used.add((room, target))
                continue
            deps = " ".join(allowed[room]) or "nothing"
            refuse(pos, f"{room} -> {target} ({how}) is not an allowed arrow; {room} may use: {deps}")

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
  # Each mutation adds an upward arrow (or a way to hide one) to a copy of the tree, as
  # `what the failure names|FILE=LINE[|FILE=LINE]`; the check must fail and name it.
  local -a mutations=(
    'devices -> vmm|devices/mod.rs=use crate::vmm::Vmm;'
    'boot -> machine|boot/mod.rs=use crate::{config::VmmConfig, machine::Machine};'
    'machine -> live|machine/mod.rs=fn f() { let _ = crate::live::source::EXIT_GRACE; }'
    'persist -> devices|persist/mod.rs=use super::devices::PioBus;'
    'devices -> vmm|devices/mod.rs=use crate::Vmm;'
    'devices -> vmm|devices/mod.rs=use crate::r#vmm::Vmm;'
    'devices -> vmm|devices/mod.rs=use crate::{{vmm::Vmm}};'
    'devices -> vmm|devices/mod.rs=use self::super::vmm::Vmm;'
    'devices -> vmm|devices/serial/mod.rs=use super::{super::vmm::Vmm};'
    'devices -> vmm|devices/mod.rs=const B: &[u8] = br"\"; use crate::vmm::Vmm;'
    'globs or re-binds|devices/mod.rs=use crate::*;'
    'crate root used as a name|devices/mod.rs=use crate as c;'
    'from another room|devices/mod.rs=#[path = "../vmm/control.rs"] mod c;'
    're-exports persist|devices/mod.rs=pub use crate::persist::VmState as Laundered;'
    'devices -> vmm|lib.rs=pub use vmm as top;|devices/mod.rs=use crate::top::Vmm;'
    'extern crate self|lib.rs=extern crate self as vmm_core;'
  )
  local m want edit file line out
  for m in "${mutations[@]}"; do
    want=${m%%|*}
    rm -rf "$tmp/src"
    cp -r vmm-core/src "$tmp/src"
    local rest=${m#*|} shown=""
    while [ -n "$rest" ]; do
      edit=${rest%%|*}
      [ "$edit" = "$rest" ] && rest="" || rest=${rest#*|}
      file=${edit%%=*}
      line=${edit#*=}
      printf '\n%s\n' "$line" >>"$tmp/src/$file"
      shown+="'$line' in $file; "
    done
    if out=$(check "$tmp/src"); then
      echo "self-test FAILED: ${shown}passed the check"
      return 1
    fi
    grep -qF "$want" <<<"$out" || { echo "self-test FAILED: ${shown}the check did not say '$want': $out"; return 1; }
    echo "self-test: ${shown}refused: $(grep -m1 -F "$want" <<<"$out")"
  done
  echo "self-test ok: ${#mutations[@]} upward imports (or ways to hide one) refused"
}

case "${1:-}" in
  --self-test) self_test ;;
  -h|--help) sed -n '2,16p' "$0" ;;
  -*) echo "usage: $0 [SRC_DIR] | --self-test" >&2; exit 2 ;;
  *) check "${1:-vmm-core/src}" ;;
esac
