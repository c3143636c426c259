#!/usr/bin/env python3
"""Import cycles among a crate's modules (files), from `crate::a::b` paths in its source.

    scripts/module-cycles.py coordinator/src [agent/src ...]

Prints each cycle found and exits 1 if there is one. A module that names another's
items (`crate::fleet::FleetMsg`) depends on it; a parent `mod.rs` declaring its children
is not counted, and test modules (`tests.rs`, `#[cfg(test)]` blocks) are skipped.
"""
import os
import re
import sys


def module_of(root, path):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    if rel in (["lib"], ["main"]):
        return "crate"
    return "::".join(rel)


def code_only(text):
    """The text before any `#[cfg(test)]`, without comments (doc links are not uses)."""
    i = text.find("#[cfg(test)]")
    text = text if i < 0 else text[:i]
    return re.sub(r"//[^\n]*", "", text)


def graph(root):
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".rs")]
    mods = {module_of(root, f): f for f in files if not f.endswith("tests.rs")}
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        if m == "crate" or "/bin/" in f:
            continue
        text = code_only(open(f).read())
        for path in re.findall(r"crate::((?:[a-z_][a-z0-9_]*::)*[A-Za-z_][A-Za-z0-9_]*)", text):
            parts = path.split("::")
            # The longest prefix that is a module.
            for n in range(len(parts), 0, -1):
                target = "::".join(parts[:n])
                if target in mods:
                    break
            else:
                continue
            if target != m and not m.startswith(target + "::") and not target.startswith(m + "::"):
                edges[m].add(target)
    return edges


def cycles(edges):
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for t in sorted(edges.get(n, ())):
            if state.get(t) == 1:
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    return found


bad = False
for root in sys.argv[1:]:
    found = cycles(graph(root))
    for c in found:
        print(f"{root}: cycle: {' -> '.join(c)}")
    if not found:
        print(f"{root}: no import cycles")
    bad = bad or bool(found)
sys.exit(1 if bad else 0)
