#!/usr/bin/env python3
"""Fails when the top-level modules of host/src import each other in a cycle.

A top-level module is a file `host/src/NAME.rs` or a folder `host/src/NAME/`. Module A
depends on module B when any non-test code under A names `crate::B` (in a `use` or a
path). Test modules (`#[cfg(test)]` to the end of the file) are left out: tests may reach
anywhere. Prints the dependency graph in layer order, or the cycles it found.

    scripts/check-layers.py [--graph]
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "host" / "src"
# Entry points wire everything together and sit above every layer.
ENTRY = {"lib", "main"}


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".rs")


def non_test_code(text: str) -> str:
    cut = re.search(r"^#\[cfg\(test\)\]", text, re.MULTILINE)
    code = text[: cut.start()] if cut else text
    # Comments may name other modules in prose or links; only code counts.
    return "\n".join(line.split("//", 1)[0] for line in code.splitlines())


def uses(code: str) -> set[str]:
    found = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", code))
    # Grouped imports: `use crate::{a, b::c}`.
    for group in re.findall(r"\bcrate::\{([^}]*)\}", code, re.DOTALL):
        found.update(re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", group))
    return found


def graph() -> dict[str, set[str]]:
    deps: dict[str, set[str]] = {}
    modules = {module_of(p) for p in ROOT.rglob("*.rs")}
    for path in ROOT.rglob("*.rs"):
        module = module_of(path)
        if module in ENTRY:
            continue
        found = uses(non_test_code(path.read_text())) & modules
        deps.setdefault(module, set()).update(found - {module} - ENTRY)
    return deps


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(deps.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(deps):
        if node not in index:
            visit(node)
    return found


def layers(deps: dict[str, set[str]]) -> list[list[str]]:
    placed: dict[str, int] = {}
    remaining = set(deps)
    while remaining:
        ready = {m for m in remaining if deps[m] <= set(placed)}
        if not ready:
            break
        level = len({*placed.values()})
        for module in ready:
            placed[module] = level
        remaining -= ready
    by_level: dict[int, list[str]] = {}
    for module, level in placed.items():
        by_level.setdefault(level, []).append(module)
    return [sorted(by_level[level]) for level in sorted(by_level)]


def main() -> int:
    deps = graph()
    found = cycles(deps)
    if found:
        for component in found:
            print("import cycle between top-level modules: " + ", ".join(component))
            for module in component:
                inside = sorted(deps[module] & set(component))
                print(f"  {module} -> {', '.join(inside)}")
        return 1
    if "--graph" in sys.argv:
        for level, modules in enumerate(layers(deps)):
            for module in modules:
                below = ", ".join(sorted(deps[module])) or "-"
                print(f"layer {level}: {module} -> {below}")
    print(f"layers: {len(deps)} top-level modules, no import cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
