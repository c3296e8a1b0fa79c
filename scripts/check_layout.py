#!/usr/bin/env python3
"""The workspace's layout rules (issue 13), checked from `cargo metadata`, `cargo tree` and the
sources; prints one line per broken rule and exits 1 when any is.

- arrows point down only: the CLI on services (`rowsmith up` runs them) and shared crates,
  services on shared crates, shared crates on shared crates only; no service on another
  service (test-only dependencies aside);
- no DuckDB or tiktoken under the poller, the submitter or the provider simulator;
- within a crate, the modules below the root do not import each other in a circle.
"""
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIGHT = ["rowsmith-poller", "rowsmith-submitter", "rowsmith-provider-sim"]
HEAVY = ["duckdb", "libduckdb-sys", "tiktoken-rs"]

problems = []


def kind(manifest: pathlib.Path) -> str:
    part = manifest.relative_to(ROOT).parts[0]
    return {"shared": "shared", "services": "service", "cli": "cli", "tests": "tests"}.get(part, part)


def check_arrows(metadata: dict) -> None:
    members = {p["name"]: p for p in metadata["packages"]}
    for package in members.values():
        own = kind(pathlib.Path(package["manifest_path"]))
        for dep in package["dependencies"]:
            if dep["name"] not in members or dep.get("kind") == "dev":
                continue
            theirs = kind(pathlib.Path(members[dep["name"]]["manifest_path"]))
            allowed = {
                "shared": {"shared"},
                "service": {"shared"},
                # `rowsmith up` runs the four services in one process.
                "cli": {"shared", "service"},
                "tests": {"shared", "service", "cli"},
            }[own]
            if theirs not in allowed:
                problems.append(f"{package['name']} ({own}) depends on {dep['name']} ({theirs}): arrows point down only")


def check_weight() -> None:
    for package in LIGHT:
        tree = subprocess.run(
            ["cargo", "tree", "--locked", "-p", package, "-e", "normal,build", "--prefix", "none", "--format", "{p}"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
        names = {line.split()[0] for line in tree.splitlines() if line.strip()}
        for heavy in HEAVY:
            if heavy in names:
                problems.append(f"{package} links {heavy}: only ingest, the merger and the CLI may")


USE = re.compile(r"\bcrate::(\w+)")


def check_module_cycles(metadata: dict) -> None:
    for package in metadata["packages"]:
        for target in package["targets"]:
            if not {"lib", "bin"} & set(target["kind"]):
                continue
            src = pathlib.Path(target["src_path"]).parent
            modules = {f.stem: f for f in src.glob("*.rs") if f.stem not in ("lib", "main")}
            graph = {
                name: {m for m in USE.findall(path.read_text(encoding="utf-8")) if m in modules and m != name}
                for name, path in modules.items()
            }
            cycle = find_cycle(graph)
            if cycle:
                problems.append(f"{package['name']}: modules import each other in a circle: {' -> '.join(cycle)}")


def find_cycle(graph: dict) -> list | None:
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else path + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def main() -> int:
    metadata = json.loads(subprocess.run(
        ["cargo", "metadata", "--locked", "--format-version", "1", "--no-deps"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout)
    check_arrows(metadata)
    check_weight()
    check_module_cycles(metadata)
    for problem in problems:
        print(f"check_layout: {problem}")
    if problems:
        return 1
    crates = len(metadata["packages"])
    print(f"check_layout: ok: {crates} crates, arrows down only, no DuckDB or tiktoken under {', '.join(LIGHT)}, no module cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
