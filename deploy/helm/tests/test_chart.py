"""The Helm chart, rendered by the real Helm engine (helm-python-sdk), validated against
the Kubernetes 1.30 schema (kubernetes-validate), and its commands checked against the
real damselfly binary ($DAMSELFLY_BIN, default target/debug/damselfly)."""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import helm_python
    import kubernetes_validate
    import yaml
except ImportError as e:
    raise ImportError(
        f"{e}: the chart tests need the PyPI packages helm-python-sdk, kubernetes-validate "
        "and PyYAML: run `cargo xtask setup`"
    ) from None
import pytest

HELM = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HELM))
import render  # noqa: E402

ROOT = HELM.parents[1]
BIN = Path(os.environ.get("DAMSELFLY_BIN") or ROOT / "target/debug/damselfly")
KUBE_VERSION = "1.30"
# Custom resources: not in the core schema, checked field by field below.
CRD_KINDS = {"ServiceMonitor", "Certificate"}

VARIANTS = {
    "default": {},
    "seed-peers": {"seedPeer": {"enabled": True, "replicas": 2, "storage": "50Gi",
                                "cacheSize": "45GiB", "storageClassName": "fast"}},
    "jaeger": {"jaeger": {"enabled": True}},
    "existing-secret": {"pki": {"mode": "existingSecret", "existingSecret": "my-pki",
                                "existingTrackerSecret": "my-tracker-pki"}},
    "cert-manager": {"pki": {"mode": "certManager",
                             "certManager": {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}}},
    "capabilities": {"agent": {"privileged": False}},
    "everything": {
        "registries": ["registry.example.com", "*.mirror.example.com"],
        "upstreamCA": {"configMap": "registry-ca"},
        "agent": {"zone": "eu-1a", "uploadRate": "100MiB", "downloadRate": "200MiB",
                  "originRate": "50MiB/s", "maxUploadPeers": 8, "cacheSize": "5GiB",
                  "steer": {"ports": [443], "exclude": ["10.0.0.0/8", "fd00::/8"]}},
        "ca": {"restartRuntime": False},
        "tracker": {"replicas": 3, "maxState": "128MiB", "maxConnections": 2048},
        "seedPeer": {"enabled": True},
        "tracing": {"otlpEndpoint": "http://otel-collector.monitoring:4317"},
        "serviceMonitor": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    },
}


def objects(values):
    docs = []
    for text in render.render(values).values():
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def find(objs, kind, suffix):
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: {len(found)} found"
    return found[0]


def pod(objs, kind, suffix):
    return find(objs, kind, suffix)["spec"]["template"]["spec"]


def container(spec, name, init=False):
    return next(c for c in spec["initContainers" if init else "containers"] if c["name"] == name)


def flags(args):
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def arg(args, flag):
    values = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    assert len(values) <= 1, f"{flag} given {len(values)} times"
    return values[0] if values else None


def help_flags(*subcommand):
    out = subprocess.run([BIN, *subcommand, "--help"], capture_output=True, text=True,
                         check=True, env=clean_env()).stdout
    return set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", out, re.M)) - {"--help"}


def clean_env():
    """No DAMSELFLY_* from the caller: the binary must parse what the manifest says."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DAMSELFLY_")}


def damselfly_containers(objs):
    for o in objs:
        spec = o.get("spec", {}).get("template", {}).get("spec")
        if spec:
            for c in spec.get("initContainers", []) + spec["containers"]:
                if c.get("command") == ["damselfly"]:
                    yield o["metadata"]["name"], c


@pytest.fixture(scope="module")
def rendered():
    return {name: objects(values) for name, values in VARIANTS.items()}


@pytest.fixture(scope="module", autouse=True)
def binary():
    assert BIN.is_file(), f"{BIN} not built: cargo build -p damselfly --bin damselfly"


def test_helm_lint_is_clean():
    report = helm_python.lint(HELM / "damselfly", strict=True, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("values", [
    {"pki": {"mode": "selfSigned"}},
    {"pki": {"mode": "existingSecret"}},
    {"pki": {"mode": "existingSecret", "existingSecret": "peers-only"}},
    {"tracker": {"maxState": "lots"}},
    {"tracker": {"maxConnections": 0}},
    {"pki": {"mode": "certManager"}},
    {"agent": {"privileged": "yes"}},
    {"agent": {"steer": {"ports": [0, 443]}}},
    {"agent": {"steer": {"exclude": ["not-a-cidr"]}}},
    {"agent": {"cacheSize": "lots"}},
    {"agent": {"uploadRate": 100}},
    {"tracker": {"replicas": 0}},
    {"tracing": {"otlpEndpoint": "jaeger:4317"}},
    {"registries": ["registry.example.com:5000"]},
    {"agnet": {}},
])
def test_schema_rejects_bad_values(values):
    with pytest.raises(helm_python.HelmValuesError):
        render.render(values)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_valid_kubernetes_1_30(rendered, variant):
    objs = rendered[variant]
    assert objs
    for o in objs:
        if o["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{o['kind']}/{o['metadata']['name']}: {e.message} at {list(e.path)}")
        assert o["metadata"]["namespace"] == "damselfly" or o["kind"] == "Namespace"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_command_is_accepted_by_the_binary(rendered, variant):
    """Flag names are in --help, and the binary parses every value (clap checks each
    value as it reads it, and stops at the trailing --help before starting anything)."""
    known = {"agent": help_flags("agent"), "tracker": help_flags("tracker"),
             "ca": help_flags("ca", "install")}
    fields = {"HOST_IP": "192.0.2.10", "POD_IP": "10.244.1.5"}
    seen = set()
    for owner, c in damselfly_containers(rendered[variant]):
        args = [re.sub(r"\$\((\w+)\)", lambda m: fields[m[1]], a) for a in c["args"]]
        sub = args[0]
        seen.add(sub)
        unknown = flags(args) - known[sub]
        assert not unknown, f"{owner}/{c['name']}: flags the binary lacks: {unknown}"
        run = subprocess.run([BIN, *args, "--help"], capture_output=True, text=True,
                             env=clean_env())
        assert run.returncode == 0, f"{owner}/{c['name']} {args}: {run.stderr}"
    assert {"agent", "tracker", "ca"} <= seen


@pytest.mark.parametrize("variant", ["default", "capabilities"])
def test_agent_daemonset_security_and_mounts(rendered, variant):
    objs = rendered[variant]
    ds = find(objs, "DaemonSet", "-agent")
    spec = ds["spec"]["template"]["spec"]
    agent = container(spec, "agent")
    init = container(spec, "ca-install", init=True)
    sc = agent["securityContext"]
    if variant == "default":
        assert sc == {"privileged": True}
        propagation = "Bidirectional"
    else:
        assert sc["privileged"] is False
        assert sc["capabilities"]["add"] == ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"]
        assert init["securityContext"] == {"privileged": False}
        propagation = "HostToContainer"  # Bidirectional is for privileged containers only
    assert spec["hostNetwork"] is True
    assert "hostPID" not in spec
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1}}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    bpffs = mounts["/sys/fs/bpf"]
    assert volumes[bpffs["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    assert bpffs["mountPropagation"] == propagation
    cgroup = mounts["/sys/fs/cgroup"]
    assert cgroup["readOnly"] is True
    assert volumes[cgroup["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert arg(agent["args"], "--cgroup") == "/sys/fs/cgroup"
    assert volumes[mounts["/var/lib/damselfly"]["name"]]["hostPath"]["path"] == "/var/lib/damselfly"
    assert "/host" not in mounts, "the host root is for the init container only"
    host = next(m for m in init["volumeMounts"] if m["mountPath"] == "/host")
    assert volumes[host["name"]]["hostPath"]["path"] == "/"
    assert not host.get("readOnly")
    for probe in ("livenessProbe", "readinessProbe"):
        assert agent[probe]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert {"name": "admin", "containerPort": 7402, "protocol": "TCP"} in agent["ports"]
    assert arg(agent["args"], "--admin") == "0.0.0.0:7402"
    for c in (agent, init):
        assert set(c["resources"]["limits"]) == {"cpu", "memory"}
        assert set(c["resources"]["requests"]) == {"cpu", "memory"}


def test_agent_identity_and_steering_args(rendered):
    spec = pod(rendered["default"], "DaemonSet", "-agent")
    agent = container(spec, "agent")
    env = {e["name"]: e for e in agent["env"]}
    assert env["DAMSELFLY_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    args = agent["args"]
    assert arg(args, "--peer-advertise") == "$(HOST_IP):7401"
    assert arg(args, "--steer-ports") == "443,80"
    assert arg(args, "--steer-exclude") == "10.96.0.0/12,10.244.0.0/16"
    assert arg(args, "--steer-comm").split(",")[0] == "containerd"
    for f in ("--cluster-ca", "--cluster-cert", "--cluster-key"):
        assert arg(args, f).startswith("/etc/damselfly/pki/")


@pytest.mark.parametrize("restart", [True, False])
def test_ca_install_init_container(restart):
    objs = objects({"ca": {"restartRuntime": restart}, "registries": ["r.example.com"]})
    spec = pod(objs, "DaemonSet", "-agent")
    init = container(spec, "ca-install", init=True)
    args = init["args"]
    assert args[0] == "ca" and "install" in args
    assert arg(args, "--host-root") == "/host"
    assert ("--restart-runtime" in args) == restart
    # The CA's name constraints come from the registry list: the same as the agent's.
    assert arg(args, "--registry") == arg(container(spec, "agent")["args"], "--registry")
    assert arg(args, "--state-dir") == "/var/lib/damselfly"


def test_ca_install_and_uninstall_as_rendered_cover_docker_and_podman():
    """The init containers' own command lines, run on a stand-in host root: the node CA
    lands in the trust store and in Docker's and containers/image's certs.d for every
    exact registry host, and ca-uninstall.yaml takes it all out again."""
    objs = objects({"registries": ["r.example.com", "*.mirror.example.com"]})
    install = container(pod(objs, "DaemonSet", "-agent"), "ca-install", init=True)["args"]
    uninstall_objs = [d for d in yaml.safe_load_all((ROOT / "deploy/ca-uninstall.yaml").read_text())
                      if d]
    uninstall = container(pod(uninstall_objs, "DaemonSet", "-ca-uninstall"), "ca-uninstall",
                          init=True)["args"]
    with tempfile.TemporaryDirectory(prefix="dfly-chart-") as tmp:
        host, state = Path(tmp, "host"), Path(tmp, "state")
        (host / "etc").mkdir(parents=True)
        (host / "etc/debian_version").write_text("12\n")

        def run(args):
            args = [f"--host-root={host}" if a.startswith("--host-root=") else
                    f"--state-dir={state}" if a.startswith("--state-dir=") else a for a in args]
            # No update-ca-certificates or systemctl on the stand-in host.
            env = clean_env() | {"DAMSELFLY_CA_UPDATE_COMMAND": "true",
                                 "DAMSELFLY_CA_RESTART_COMMAND": "true"}
            done = subprocess.run([BIN, *args], capture_output=True, text=True, env=env)
            assert done.returncode == 0, done.stderr
            return done.stdout

        run(install)
        pem = (state / "ca/ca.crt").read_text()
        assert (host / "usr/local/share/ca-certificates/damselfly-node-ca.crt").read_text() == pem
        for certs_d in ("etc/docker/certs.d", "etc/containers/certs.d"):
            for registry in ("r.example.com", "registry-1.docker.io", "ghcr.io"):
                assert (host / certs_d / registry / "damselfly-node-ca.crt").read_text() == pem
            assert not [p for p in (host / certs_d).iterdir() if "*" in p.name]

        run(uninstall)
        assert not (host / "usr/local/share/ca-certificates/damselfly-node-ca.crt").exists()
        assert not (host / "etc/docker").exists() and not (host / "etc/containers").exists()


@pytest.mark.parametrize("variant,replicas", [("default", 2), ("everything", 3)])
def test_tracker_statefulset_gives_agents_a_stable_list(rendered, variant, replicas):
    objs = rendered[variant]
    sts = find(objs, "StatefulSet", "-tracker")
    svc = find(objs, "Service", "-tracker")
    assert sts["spec"]["replicas"] == replicas
    assert svc["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] == "damselfly-tracker"
    spec = sts["spec"]["template"]["spec"]
    tracker = spec["containers"][0]
    assert tracker["args"][:2] == ["tracker", "--listen=0.0.0.0:7400"]
    # TLS with the tracker's own certificate, never the peers' Secret.
    mounts = {m["mountPath"]: m["name"] for m in tracker["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    pki = volumes[mounts["/etc/damselfly/pki"]]["secret"]["secretName"]
    assert pki == "damselfly-tracker-pki"
    for f in ("--cluster-ca", "--cluster-cert", "--cluster-key"):
        assert arg(tracker["args"], f).startswith("/etc/damselfly/pki/")
    assert spec["securityContext"]["fsGroup"] == tracker["securityContext"]["runAsGroup"]
    assert arg(tracker["args"], "--max-state") == ("128MiB" if variant == "everything" else "64MiB")
    assert arg(tracker["args"], "--max-connections") == \
        ("2048" if variant == "everything" else "512")
    for probe in ("livenessProbe", "readinessProbe"):
        assert tracker[probe]["tcpSocket"] == {"port": "grpc"}
    assert tracker["resources"]["limits"]
    want = ",".join(f"damselfly-tracker-{i}.damselfly-tracker.damselfly.svc:7400"
                    for i in range(replicas))
    for _, c in damselfly_containers(objs):
        if c["args"][0] == "agent":
            assert arg(c["args"], "--tracker") == want


def test_seed_peers(rendered):
    objs = rendered["seed-peers"]
    sts = find(objs, "StatefulSet", "-seed")
    assert sts["spec"]["replicas"] == 2
    spec = sts["spec"]["template"]["spec"]
    assert not spec.get("hostNetwork")
    seed = container(spec, "seed")
    args = seed["args"]
    assert args[:2] == ["agent", "--seed"]
    assert arg(args, "--admin") == "0.0.0.0:7402"
    assert arg(args, "--cache-size") == "45GiB"
    assert arg(args, "--peer-advertise") == "$(POD_IP):7401"
    agent_args = container(pod(objs, "DaemonSet", "-agent"), "agent")["args"]
    for f in ("--cluster-ca", "--cluster-cert", "--cluster-key", "--tracker"):
        assert arg(args, f) == arg(agent_args, f)
    state = next(m for m in seed["volumeMounts"] if m["mountPath"] == arg(args, "--state-dir"))
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == state["name"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert seed["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert not [o for o in rendered["default"] if o["metadata"]["name"].endswith("-seed")]


@pytest.mark.parametrize("variant,endpoint", [
    ("default", None),
    ("jaeger", "http://damselfly-jaeger.damselfly.svc:4317"),
    ("everything", "http://otel-collector.monitoring:4317"),
])
def test_tracing_endpoint(rendered, variant, endpoint):
    objs = rendered[variant]
    for _, c in damselfly_containers(objs):
        if c["args"][0] in ("agent", "tracker"):
            assert arg(c["args"], "--otlp-endpoint") == endpoint
        else:
            assert "--otlp-endpoint" not in flags(c["args"])
    if variant == "jaeger":
        svc = find(objs, "Service", "-jaeger")
        ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        assert ports == {"ui": 16686, "otlp-grpc": 4317}
        jaeger = container(pod(objs, "Deployment", "-jaeger"), "jaeger")
        assert jaeger["image"].startswith("jaegertracing/all-in-one:")


def start_tracker(pki_dir, cert, key):
    """The real binary as the chart runs it, with these files: (exit code or None if it
    started listening, its log)."""
    proc = subprocess.Popen(
        [BIN, "tracker", "--listen=127.0.0.1:0", f"--cluster-ca={pki_dir}/ca.crt",
         f"--cluster-cert={pki_dir}/{cert}", f"--cluster-key={pki_dir}/{key}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env())
    log = []
    try:
        for line in proc.stderr:
            log.append(line)
            if "tracker listening" in line:
                return None, "".join(log)
        return proc.wait(timeout=10), "".join(log)
    finally:
        proc.kill()
        proc.wait()


def test_generated_pki_is_a_cluster_ca_a_peer_and_a_tracker_certificate(rendered):
    peer = find(rendered["default"], "Secret", "-cluster-pki")
    tracker = find(rendered["default"], "Secret", "-tracker-pki")
    b64 = __import__("base64").b64decode
    for secret in (peer, tracker):
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    assert peer["data"]["ca.crt"] == tracker["data"]["ca.crt"], "one CA for both"
    with tempfile.TemporaryDirectory() as d:
        Path(d, "ca.crt").write_bytes(b64(peer["data"]["ca.crt"]))
        for name, secret in (("peer", peer), ("tracker", tracker)):
            Path(d, f"{name}.crt").write_bytes(b64(secret["data"]["tls.crt"]))
            Path(d, f"{name}.key").write_bytes(b64(secret["data"]["tls.key"]))
        ca = Path(d, "ca.crt")
        for name, purposes, san in (("peer", ("sslserver", "sslclient"), "DNS:damselfly-peer"),
                                    ("tracker", ("sslserver",), "DNS:damselfly-tracker")):
            crt = Path(d, f"{name}.crt")
            for purpose in purposes:
                subprocess.run(["openssl", "verify", "-purpose", purpose, "-CAfile", ca, crt],
                               check=True, capture_output=True)
            text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                                   crt], check=True, capture_output=True, text=True).stdout
            assert san in text and "damselfly-" + ("tracker" if name == "peer" else "peer") \
                not in text, text
            # The key belongs to the certificate.
            pub = [subprocess.run(["openssl", *cmd], check=True, capture_output=True).stdout
                   for cmd in (["x509", "-noout", "-pubkey", "-in", crt],
                               ["pkey", "-pubout", "-in", Path(d, f"{name}.key")])]
            assert pub[0] == pub[1]
        # The real tracker starts with its certificate (Helm's RSA PKCS#1), and refuses the
        # peers' with a message naming the name it lacks.
        code, log = start_tracker(d, "tracker.crt", "tracker.key")
        assert code is None, log
        code, log = start_tracker(d, "peer.crt", "peer.key")
        assert code not in (None, 0), log
        assert "no subjectAltName DNS:damselfly-tracker" in log, log
    for variant in ("existing-secret", "cert-manager"):
        assert not [o for o in rendered[variant] if o["kind"] == "Secret"]
    mounted = pod(rendered["existing-secret"], "DaemonSet", "-agent")["volumes"]
    assert {"name": "pki", "secret": {"secretName": "my-pki", "defaultMode": 0o440}} in mounted
    mounted = pod(rendered["existing-secret"], "StatefulSet", "-tracker")["volumes"]
    assert {"name": "pki", "secret": {"secretName": "my-tracker-pki", "defaultMode": 0o440}} \
        in mounted


def test_cert_manager_certificate(rendered):
    objs = rendered["cert-manager"]
    cert = find(objs, "Certificate", "-peer")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    spec = cert["spec"]
    assert spec["dnsNames"] == ["damselfly-peer"]
    assert {"server auth", "client auth"} <= set(spec["usages"])
    assert spec["issuerRef"] == {"name": "ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    volumes = pod(objs, "DaemonSet", "-agent")["volumes"]
    assert {"name": "pki", "secret": {"secretName": spec["secretName"], "defaultMode": 0o440}} \
        in volumes
    tracker = find(objs, "Certificate", "-tracker")["spec"]
    assert tracker["dnsNames"] == ["damselfly-tracker"]
    assert "server auth" in tracker["usages"] and "client auth" not in tracker["usages"]
    assert tracker["issuerRef"] == spec["issuerRef"]
    assert tracker["secretName"] != spec["secretName"]
    volumes = pod(objs, "StatefulSet", "-tracker")["volumes"]
    assert {"name": "pki", "secret": {"secretName": tracker["secretName"],
                                      "defaultMode": 0o440}} in volumes


def test_service_monitor_and_dashboard(rendered):
    objs = rendered["everything"]
    sm = find(objs, "ServiceMonitor", "damselfly")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["endpoints"][0]["port"] == "admin"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    selector = sm["spec"]["selector"]
    scraped = [o for o in objs if o["kind"] == "Service"
               and selector["matchLabels"].items() <= o["metadata"]["labels"].items()
               and o["metadata"]["labels"]["app.kubernetes.io/component"]
               in selector["matchExpressions"][0]["values"]]
    assert {s["metadata"]["name"] for s in scraped} == {"damselfly-agent", "damselfly-seed"}
    for s in scraped:
        assert s["spec"]["ports"] == [{"name": "admin", "port": 7402, "targetPort": "admin",
                                       "protocol": "TCP"}]
    cm = find(objs, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    exprs = " ".join(t["expr"] for p in json.loads(cm["data"]["damselfly.json"])["panels"]
                     for t in p["targets"])
    for metric in ("damselfly_blob_bytes_total", "damselfly_peer_bytes_total",
                   "damselfly_pieces_total", "damselfly_peers_connected",
                   "damselfly_cache_bytes", "damselfly_tracker_requests_total"):
        assert metric in exprs


def test_ca_uninstall_daemonset():
    objs = [d for d in yaml.safe_load_all((ROOT / "deploy/ca-uninstall.yaml").read_text()) if d]
    for o in objs:
        kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
    spec = pod(objs, "DaemonSet", "-ca-uninstall")
    init = container(spec, "ca-uninstall", init=True)
    assert init["args"][:2] == ["ca", "uninstall"]
    assert flags(init["args"]) <= help_flags("ca", "uninstall")
    run = subprocess.run([BIN, *init["args"], "--help"], capture_output=True, env=clean_env())
    assert run.returncode == 0, run.stderr
    assert spec["tolerations"] == [{"operator": "Exists"}]


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_pod_gets_a_service_account_token(rendered, variant):
    """Nothing in Damselfly talks to the Kubernetes API: a token in a pod is only loot."""
    ca_uninstall = [d for d in yaml.safe_load_all((ROOT / "deploy/ca-uninstall.yaml").read_text()) if d]
    for o in rendered[variant] + ca_uninstall:
        spec = o.get("spec", {}).get("template", {}).get("spec")
        if spec:
            assert spec.get("automountServiceAccountToken") is False, o["metadata"]["name"]


def test_manifests_match_a_fresh_render():
    assert render.stale() == [], "deploy/manifests is stale: run `cargo xtask manifests`"
    kustomization = yaml.safe_load((render.MANIFESTS / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "damselfly"
    files = {p.name for p in render.MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
