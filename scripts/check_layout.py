#!/usr/bin/env python3
"""The workspace's layout rules (issue 13), checked from `cargo metadata`, `cargo tree` and the
sources; prints one line per broken rule and exits 1 when any is.

- arrows point down only: the CLI on services (`rowsmith up` runs them) and shared crates,
  services on shared crates, shared crates on shared crates only; no service on another
  service (test-only dependencies aside);
- no DuckDB or tiktoken under the poller, the submitter or the provider simulator;
- within a crate, the modules below the root do not import each other in a circle;
- no function of product code (tests and examples aside) is over 100 lines.
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


# No function in product code is longer than this (lines from `fn` to its closing brace).
MAX_FUNCTION_LINES = 100
FN_START = re.compile(r"^(\s*)(pub(\([a-z]+\))? )?(const )?(async )?(unsafe )?fn (\w+)")


def long_functions(path: pathlib.Path) -> list:
    """(name, first line, length) of each function over MAX_FUNCTION_LINES in `path`, test
    modules left out."""
    lines = path.read_text().split("\n")
    found = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "#[cfg(test)]" and i + 1 < len(lines) and lines[i + 1].startswith("mod tests"):
            break
        match = FN_START.match(lines[i])
        if not match:
            i += 1
            continue
        indent, name = match.group(1), match.group(7)
        # A declaration without a body (a trait's) ends with `;` before any `{`.
        j = i
        while j < len(lines) and "{" not in lines[j] and not lines[j].rstrip().endswith(";"):
            j += 1
        if j < len(lines) and "{" not in lines[j]:
            i = j + 1
            continue
        end = j
        while end < len(lines) and lines[end] != indent + "}" and not (
            end == j and lines[end].rstrip().endswith("}")
        ):
            end += 1
        length = end - i + 1
        if length > MAX_FUNCTION_LINES:
            found.append((name, i + 1, length))
        i = end + 1
    return found


def check_function_length() -> None:
    for top in ["shared", "services", "cli"]:
        for path in sorted((ROOT / top).rglob("*.rs")):
            relative = path.relative_to(ROOT)
            if "examples" in relative.parts or "tests" in relative.parts:
                continue
            for name, line, length in long_functions(path):
                problems.append(
                    f"{relative}:{line}: fn {name} is {length} lines, over {MAX_FUNCTION_LINES}: "
                    "split it into named steps"
                )


def main() -> int:
    metadata = json.loads(subprocess.run(
        ["cargo", "metadata", "--locked", "--format-version", "1", "--no-deps"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout)
    check_arrows(metadata)
    check_weight()
    check_module_cycles(metadata)
    check_function_length()
    for problem in problems:
        print(f"check_layout: {problem}")
    if problems:
        return 1
    crates = len(metadata["packages"])
    print(f"check_layout: ok: {crates} crates, arrows down only, no DuckDB or tiktoken under {', '.join(LIGHT)}, no module cycle, no function over {MAX_FUNCTION_LINES} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
