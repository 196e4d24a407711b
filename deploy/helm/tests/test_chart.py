"""The Helm chart, rendered by the real Helm engine (helm-python-sdk), validated against
the Kubernetes 1.30 schema (kubernetes-validate), and its commands checked against the
real damselfly binary ($DAMSELFLY_BIN, default target/debug/damselfly)."""

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
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
# The chart's cluster-access probe (templates/_helpers.tpl). helm-python-sdk renders as
# `helm template` does, with no cluster: `lookup` finds nothing and pki.mode=generate
# refuses to render. The tests render what `helm install` renders on a first install from
# a copy of the chart whose probe answers yes (every other lookup still finds nothing).
CLUSTER_PROBE = '{{- if lookup "v1" "Secret" .Release.Namespace "" }}true{{ end }}'
EXISTING_PKI = {"pki": {"mode": "existingSecret", "existingSecret": "my-pki",
                        "existingTrackerSecret": "my-tracker-pki"}}
CERT_MANAGER = {"pki": {"mode": "certManager",
                        "certManager": {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}}}

VARIANTS = {
    "default": {},
    "seed-peers": {"seedPeer": {"enabled": True, "replicas": 2, "storage": "50Gi",
                                "cacheSize": "45GiB", "storageClassName": "fast"}},
    "jaeger": {"jaeger": {"enabled": True}},
    "existing-secret": EXISTING_PKI,
    "cert-manager": CERT_MANAGER,
    "capabilities": {"agent": {"privileged": False}},
    "ipv6": {"ipv6": True},
    "no-cleanup": {"cleanup": {"enabled": False}, "seedPeer": {"enabled": True}},
    "network-policy": {"networkPolicy": {"enabled": True,
                                         "nodeCIDRs": ["192.168.0.0/16", "fd00:10::/64"]},
                       "seedPeer": {"enabled": True}},
    "everything": {
        "registries": ["registry.example.com", "*.mirror.example.com"],
        "upstreamCA": {"configMap": "registry-ca"},
        "agent": {"zone": "eu-1a", "uploadRate": "100MiB", "downloadRate": "200MiB",
                  "originRate": "50MiB/s", "maxUploadPeers": 8, "cacheSize": "5GiB",
                  "steer": {"ports": [443], "exclude": ["10.0.0.0/8", "fd00::/8"]},
                  "nodeSelector": {"kubernetes.io/os": "linux", "pool": "builders"},
                  "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ci",
                                   "effect": "NoSchedule"}],
                  "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                      "nodeSelectorTerms": [{"matchExpressions": [
                          {"key": "kubernetes.io/arch", "operator": "In",
                           "values": ["amd64", "arm64"]}]}]}}},
                  "priorityClassName": "node-agents", "priorityClassQuota": True},
        "ca": {"restartRuntime": False},
        "tracker": {"replicas": 3, "maxState": "128MiB", "maxConnections": 2048},
        "cleanup": {"timeoutSeconds": 900},
        "seedPeer": {"enabled": True},
        "tracing": {"otlpEndpoint": "http://otel-collector.monitoring:4317"},
        "serviceMonitor": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    },
}


_ONLINE = []


def online_chart():
    """The chart as `helm install` renders it: its cluster-access probe answers yes."""
    if not _ONLINE:
        tmp = Path(tempfile.mkdtemp(prefix="dfly-chart-"))
        atexit.register(shutil.rmtree, tmp, True)
        shutil.copytree(render.CHART, tmp / render.CHART.name)
        helpers = tmp / render.CHART.name / "templates/_helpers.tpl"
        text = helpers.read_text()
        assert text.count(CLUSTER_PROBE) == 1, "the cluster-access probe changed: update the tests"
        helpers.write_text(text.replace(CLUSTER_PROBE, "true"))
        _ONLINE.append(tmp / render.CHART.name)
    return _ONLINE[0]


def parse(rendered):
    docs = []
    for text in rendered.values():
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def objects(values, online=True):
    """Every object the chart renders: with cluster access (helm install) or, online=False,
    without (helm template, Argo CD)."""
    return parse(render.render(values, chart_dir=online_chart() if online else render.CHART))


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


def lint_problems(values):
    report = helm_python.lint(HELM / "damselfly", values, strict=True,
                              kube_version=f"v{KUBE_VERSION}.0")
    return [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]


@pytest.mark.parametrize("values", [{}, EXISTING_PKI, CERT_MANAGER],
                         ids=["default", "existing", "cert-manager"])
def test_helm_lint_is_clean(values):
    """Lint renders without a cluster but in lint mode, where `fail` only logs: the default
    pki.mode=generate lints clean too."""
    assert not lint_problems(values)


GITOPS_ADVICE = ("pki.mode=existingSecret", "pki.existingSecret", "pki.existingTrackerSecret",
                 "deploy/manifests/README.md", "pki.mode=certManager", "helm template",
                 "Argo CD", "--dry-run=server")


@pytest.mark.parametrize("values", [{}, {"pki": {"mode": "generate"}}, {"seedPeer": {"enabled": True}}])
def test_generate_without_cluster_access_fails_with_gitops_advice(values):
    """`helm template` (Argo CD) cannot read back the generated PKI, so each render would make
    a new CA and split the swarm: the render fails and says what to use instead."""
    with pytest.raises(helm_python.HelmRenderError) as e:
        objects(values, online=False)
    message = str(e.value)
    for advice in GITOPS_ADVICE:
        assert advice in message, (advice, message)


@pytest.mark.parametrize("values", [EXISTING_PKI, CERT_MANAGER,
                                    EXISTING_PKI | {"seedPeer": {"enabled": True},
                                                    "jaeger": {"enabled": True}}],
                         ids=["existing", "cert-manager", "existing+seed+jaeger"])
def test_gitops_modes_render_without_cluster_access(values):
    """What Argo CD renders is what `helm install` installs: no lookup in these modes."""
    offline = objects(values, online=False)
    assert offline == objects(values)
    assert not [o for o in offline if o["kind"] == "Secret"]


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
    {"ca": {"restartSpread": "1h"}},
    {"ca": {"restartSpread": 60}},
    {"cleanup": {"timeoutSeconds": 5}},
    {"cleanup": {"enabled": "yes"}},
    {"networkPolicy": {"nodeCIDRs": ["10.0.0.1"]}},
    {"ipv6": "true"},
])
def test_schema_rejects_bad_values(values):
    with pytest.raises(helm_python.HelmValuesError):
        render.render(values, chart_dir=online_chart())


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


def accepted_by_the_binary(args, what):
    """Flag names are in --help, and the binary parses every value (clap checks each value
    as it reads it, and stops at the trailing --help before starting anything)."""
    sub = ("ca", "install") if args[0] == "ca" else (args[0],)
    unknown = flags(args) - help_flags(*sub)
    assert not unknown, f"{what}: flags the binary lacks: {unknown}"
    run = subprocess.run([BIN, *args, "--help"], capture_output=True, text=True,
                         env=clean_env())
    assert run.returncode == 0, f"{what} {args}: {run.stderr}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_command_is_accepted_by_the_binary(rendered, variant):
    # IPv6 addresses for the IPv6 variant: --peer-advertise takes either.
    v6 = variant == "ipv6"
    fields = {"HOST_IP": "2001:db8::10" if v6 else "192.0.2.10",
              "POD_IP": "fd00:10::5" if v6 else "10.244.1.5"}
    seen = set()
    for owner, c in damselfly_containers(rendered[variant]):
        args = [re.sub(r"\$\((\w+)\)", lambda m: fields[m[1]], a) for a in c["args"]]
        seen.add(args[0])
        accepted_by_the_binary(args, f"{owner}/{c['name']}")
    assert {"agent", "tracker", "ca"} <= seen
    assert ("cleanup" in seen and "cleanup-wait" in seen) == (variant != "no-cleanup")


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
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["priorityClassName"] == "system-node-critical"
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
    # A bare IP (v4 or v6): the port is --peer-listen's.
    assert arg(args, "--peer-advertise") == "$(HOST_IP)"
    assert arg(args, "--peer-listen") == "0.0.0.0:7401"
    assert arg(args, "--steer-ports") == "443,80"
    assert arg(args, "--steer-exclude") == "10.96.0.0/12,10.244.0.0/16"
    assert arg(args, "--steer-comm").split(",")[0] == "containerd"
    for f in ("--cluster-ca", "--cluster-cert", "--cluster-key"):
        assert arg(args, f).startswith("/etc/damselfly/pki/")


@pytest.mark.parametrize("restart,spread,flag", [
    (True, None, "60s"), (True, "5m", "5m"), (True, "0s", None), (False, "60s", None)])
def test_ca_install_init_container(restart, spread, flag):
    ca = {"restartRuntime": restart} | ({"restartSpread": spread} if spread else {})
    objs = objects({"ca": ca, "registries": ["r.example.com"]})
    spec = pod(objs, "DaemonSet", "-agent")
    init = container(spec, "ca-install", init=True)
    args = init["args"]
    assert args[0] == "ca" and "install" in args
    assert arg(args, "--host-root") == "/host"
    assert ("--restart-runtime" in args) == restart
    # The random wait before a restart, given only with the restart and when not zero.
    assert arg(args, "--restart-spread") == flag
    # The CA's name constraints come from the registry list: the same as the agent's.
    assert arg(args, "--registry") == arg(container(spec, "agent")["args"], "--registry")
    assert arg(args, "--state-dir") == "/var/lib/damselfly"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthz(port):
    """The status of GET /healthz, or None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def test_ca_install_and_cleanup_as_rendered_cover_docker_and_podman():
    """The init container's and the uninstall hook's own command lines, run on a stand-in
    host root: the node CA lands in the trust store and in Docker's and containers/image's
    certs.d for every exact registry host, and the cleanup takes it all out again, with the
    state directory, and then says so on /healthz."""
    # No random wait before the (stand-in) restart.
    objs = objects({"registries": ["r.example.com", "*.mirror.example.com"],
                    "ca": {"restartSpread": "0s"}})
    install = container(pod(objs, "DaemonSet", "-agent"), "ca-install", init=True)["args"]
    cleanup = container(pod(objs, "DaemonSet", "-cleanup"), "cleanup")["args"]
    with tempfile.TemporaryDirectory(prefix="dfly-chart-") as tmp:
        host, state, bpffs = Path(tmp, "host"), Path(tmp, "state"), Path(tmp, "bpffs")
        (host / "etc").mkdir(parents=True)
        (host / "etc/debian_version").write_text("12\n")
        # The runtime the init container restarts (systemctl is a stand-in below).
        (host / "etc/systemd/system").mkdir(parents=True)
        (host / "etc/systemd/system/containerd.service").write_text("[Service]\n")
        bpffs.mkdir()
        port = free_port()

        def local(args):
            swap = {"--host-root": f"--host-root={host}", "--state-dir": f"--state-dir={state}",
                    "--bpffs": f"--bpffs={bpffs}", "--serve": f"--serve=127.0.0.1:{port}"}
            return [swap.get(a.split("=", 1)[0], a) for a in args]

        # No update-ca-certificates or systemctl on the stand-in host: the stand-in update
        # builds the bundle as the real one would (`ca install` checks the CA is in it).
        update = Path(tmp, "update-ca-certificates")
        update.write_text(
            "#!/bin/sh\n"
            f"mkdir -p {host}/etc/ssl/certs\n"
            f"cat /dev/null {host}/usr/local/share/ca-certificates/*.crt "
            f"> {host}/etc/ssl/certs/ca-certificates.crt 2>/dev/null\n"
            "exit 0\n")
        update.chmod(0o755)
        env = clean_env() | {"DAMSELFLY_CA_UPDATE_COMMAND": str(update),
                             "DAMSELFLY_CA_UNIT_ACTIVE_COMMAND": "true",
                             "DAMSELFLY_CA_RESTART_COMMAND": "true"}
        done = subprocess.run([BIN, *local(install)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        pem = (state / "ca/ca.crt").read_text()
        assert (host / "usr/local/share/ca-certificates/damselfly-node-ca.crt").read_text() == pem
        for certs_d in ("etc/docker/certs.d", "etc/containers/certs.d"):
            for registry in ("r.example.com", "registry-1.docker.io", "ghcr.io"):
                assert (host / certs_d / registry / "damselfly-node-ca.crt").read_text() == pem
            assert not [p for p in (host / certs_d).iterdir() if "*" in p.name]

        proc = subprocess.Popen([BIN, *local(cleanup)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            deadline = time.monotonic() + 30
            while healthz(port) != 200 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert healthz(port) == 200, f"not clean (exit code {proc.poll()})"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        assert proc.returncode == 0, err
        assert not (host / "usr/local/share/ca-certificates/damselfly-node-ca.crt").exists()
        assert not (host / "etc/docker").exists() and not (host / "etc/containers").exists()
        assert not (state / "ca").exists()


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
    assert arg(args, "--peer-advertise") == "$(POD_IP)"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
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
        # Uninstall leaves nothing: the Secrets go too (cleanup.enabled, the default).
        assert "helm.sh/resource-policy" not in secret["metadata"].get("annotations", {})
        assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    for secret in (find(rendered["no-cleanup"], "Secret", s) for s in ("-cluster-pki",
                                                                       "-tracker-pki")):
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
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


def hooks(objs):
    return [o for o in objs
            if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "post-delete"]


def matches(selector, labels):
    return selector.items() <= labels.items()


@pytest.mark.parametrize("variant", ["default", "everything", "capabilities"])
def test_uninstall_cleans_every_node_the_agent_ran_on(rendered, variant):
    objs = rendered[variant]
    hooked = hooks(objs)
    assert {(o["kind"], o["metadata"]["name"]) for o in hooked} >= {
        ("DaemonSet", "damselfly-cleanup"), ("Service", "damselfly-cleanup"),
        ("Job", "damselfly-cleanup")}
    for o in hooked:
        policy = o["metadata"]["annotations"]["helm.sh/hook-delete-policy"].split(",")
        # Re-creatable on a second uninstall attempt; left for inspection when it fails.
        assert set(policy) == {"before-hook-creation", "hook-succeeded"}, o["metadata"]["name"]
    weight = {o["kind"]: int(o["metadata"]["annotations"]["helm.sh/hook-weight"])
              for o in hooked}
    # Helm creates hooks by weight and waits only for the Job: the pods it waits for and
    # the Service it reaches them by must exist first.
    assert weight["DaemonSet"] < weight["Job"] and weight["Service"] < weight["Job"]
    assert not [o for o in objs if o not in hooked and "cleanup" in o["metadata"]["name"]]

    agent = pod(objs, "DaemonSet", "-agent")
    ds = find(objs, "DaemonSet", "-cleanup")
    spec = ds["spec"]["template"]["spec"]
    for key in ("nodeSelector", "affinity", "tolerations", "priorityClassName"):
        assert spec.get(key) == agent.get(key), key
    assert not spec.get("hostNetwork")
    assert spec["automountServiceAccountToken"] is False
    c = container(spec, "cleanup")
    assert c["securityContext"] == container(agent, "ca-install", init=True)["securityContext"]
    args = c["args"]
    assert args[0] == "cleanup"
    agent_args = container(agent, "agent")["args"]
    assert arg(args, "--instance") == arg(agent_args, "--instance")
    # The agent's state dir, reached through the host root so that it can be removed.
    assert arg(args, "--state-dir") == "/host" + arg(agent_args, "--state-dir")
    assert arg(args, "--host-root") == "/host" and arg(args, "--bpffs") == "/sys/fs/bpf"
    assert arg(args, "--serve").endswith(":7409")
    volumes = {v["name"]: v["hostPath"] for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/host"]["name"]]["path"] == "/" and not mounts["/host"].get("readOnly")
    assert set(mounts) == {"/host", "/sys/fs/bpf"}
    assert volumes[mounts["/sys/fs/bpf"]["name"]]["path"] == "/sys/fs/bpf"
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 7409, "protocol": "TCP"} in c["ports"]

    svc = find(objs, "Service", "-cleanup")["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    assert svc["ports"] == [{"name": "health", "port": 7409, "targetPort": "health",
                             "protocol": "TCP"}]
    assert matches(svc["selector"], ds["spec"]["template"]["metadata"]["labels"])
    job = find(objs, "Job", "-cleanup")
    assert not matches(svc["selector"], job["spec"]["template"]["metadata"]["labels"])
    wait = container(job["spec"]["template"]["spec"], "cleanup-wait")["args"]
    assert wait[0] == "cleanup-wait"
    assert arg(wait, "--endpoint") == "damselfly-cleanup.damselfly.svc:7409"
    timeout = 900 if variant == "everything" else 240
    assert arg(wait, "--timeout") == f"{timeout}s"
    assert job["spec"]["activeDeadlineSeconds"] > timeout
    assert 0 < job["spec"]["backoffLimit"] <= 3
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    if variant == "everything":
        # The seed peers' caches go too, and the quota that admits the agents' priority
        # class outlives Helm's deletion of the release's own (it is a hook as well).
        assert find(objs, "StatefulSet", "-seed")["spec"]["persistentVolumeClaimRetentionPolicy"] \
            == {"whenDeleted": "Delete", "whenScaled": "Retain"}
        quota = find(objs, "ResourceQuota", "-cleanup-critical-pods")
        assert quota in hooked
        assert int(quota["metadata"]["annotations"]["helm.sh/hook-weight"]) < weight["DaemonSet"]


def test_without_cleanup_uninstall_removes_only_the_release(rendered):
    objs = rendered["no-cleanup"]
    assert not hooks(objs)
    assert "persistentVolumeClaimRetentionPolicy" not in find(objs, "StatefulSet", "-seed")["spec"]


def test_priority_class_quota(rendered):
    objs = rendered["everything"]
    agent = pod(objs, "DaemonSet", "-agent")
    assert agent["priorityClassName"] == "node-agents"
    for suffix in ("damselfly-critical-pods", "-cleanup-critical-pods"):
        quota = find(objs, "ResourceQuota", suffix)["spec"]
        assert quota["scopeSelector"]["matchExpressions"] == [
            {"scopeName": "PriorityClass", "operator": "In", "values": ["node-agents"]}]
    assert not [o for o in rendered["default"] if o["kind"] == "ResourceQuota"]


def test_network_policy_lets_only_nodes_and_seeds_reach_the_tracker(rendered):
    objs = rendered["network-policy"]
    policy = find(objs, "NetworkPolicy", "-tracker")["spec"]
    tracker = find(objs, "StatefulSet", "-tracker")["spec"]["template"]["metadata"]["labels"]
    seed = find(objs, "StatefulSet", "-seed")["spec"]["template"]["metadata"]["labels"]
    agent = find(objs, "DaemonSet", "-agent")["spec"]["template"]["metadata"]["labels"]
    assert matches(policy["podSelector"]["matchLabels"], tracker)
    assert not matches(policy["podSelector"]["matchLabels"], seed)
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"port": 7400, "protocol": "TCP"}]
    blocks = [p["ipBlock"]["cidr"] for p in rule["from"] if "ipBlock" in p]
    assert blocks == ["192.168.0.0/16", "fd00:10::/64"]
    pods = [p["podSelector"]["matchLabels"] for p in rule["from"] if "podSelector" in p]
    assert len(pods) == 1 and matches(pods[0], seed) and not matches(pods[0], agent)
    assert not [o for o in rendered["default"] if o["kind"] == "NetworkPolicy"]
    with pytest.raises(helm_python.HelmRenderError, match="networkPolicy.nodeCIDRs is required"):
        objects({"networkPolicy": {"enabled": True}})


LISTEN_FLAGS = ("--listen", "--peer-listen", "--admin", "--serve")


@pytest.mark.parametrize("variant,prefix", [("ipv6", "[::]:"), ("default", "0.0.0.0:")])
def test_listen_addresses(rendered, variant, prefix):
    seen = 0
    for _, c in damselfly_containers(rendered[variant]):
        for f in LISTEN_FLAGS:
            value = arg(c["args"], f)
            assert value is None or value.startswith(prefix), (c["name"], f, value)
            seen += value is not None
    assert seen >= 4


def test_workloads_run_on_linux_nodes(rendered):
    for o in rendered["everything"] + rendered["jaeger"]:
        spec = o.get("spec", {}).get("template", {}).get("spec")
        if spec:
            assert spec["nodeSelector"]["kubernetes.io/os"] == "linux", o["metadata"]["name"]


def test_registries_comment_lists_the_agents_built_in_registries():
    """values.yaml names the registries intercepted without configuration: the agent's
    DEFAULT_REGISTRIES, all of them, in its order, and no others."""
    source = (ROOT / "agent/src/origin/hosts.rs").read_text()
    block = re.search(r"DEFAULT_REGISTRIES: &\[&str\] = &\[(.*?)\];", source, re.S)
    built_in = re.findall(r'"([^"]+)"', block[1])
    assert "docker.io" in built_in
    values = (HELM / "damselfly/values.yaml").read_text()
    comment = re.search(r"((?:^#.*\n)+)registries:", values, re.M)[1].replace("#", " ")
    listed = re.search(r"built-in public ones:(.*?)\. `\*`", comment, re.S)[1]
    assert [h.strip() for h in listed.split(",")] == built_in


def notes_commands(text):
    """The shell command lines NOTES.txt shows (indented by two spaces), with backslash
    continuations joined."""
    commands, lines = [], iter(text.splitlines())
    for line in lines:
        if not re.match(r"  ((kubectl|sleep|curl|helm)\b|[A-Z_]+=)", line):
            continue
        command = line.strip()
        while command.endswith("\\"):
            command = command[:-1] + next(lines).strip()
        commands.append(command)
    return commands


@pytest.mark.parametrize("variant", VARIANTS)
def test_notes_commands_work_as_written(variant):
    """Every command in NOTES.txt can be pasted as is: valid shell, every variable set
    before it is used, nothing after a port-forward that blocks, the namespace on every
    kubectl call, and each damselfly command accepted by the binary."""
    text = render.notes(VARIANTS[variant], chart_dir=online_chart())
    lines = notes_commands(text)
    assert len(lines) >= 8, text
    script = "\n".join(lines) + "\n"
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert not re.search(r"<[a-z ]+>|\bNODE\b", script), "a placeholder in a command"
    defined = {"!"}
    for line in lines:
        for used in re.findall(r"\$\{?([A-Za-z_!][A-Za-z0-9_]*)", line):
            assert used in defined, f"${used} used before it is set: {line}"
        defined |= set(re.findall(r"(?:^|;\s*)([A-Z_]+)=", line))
        if "port-forward" in line:
            # A port-forward blocks: only in the background may anything follow it.
            after = line[line.index("port-forward"):]
            assert "&&" not in after, line
            assert after.endswith("&") or not re.search(r"[;|&]", after), line
        if line.startswith("kubectl") and " get --raw " not in line:
            assert " -n damselfly " in line, line
        if " -- damselfly " in line:
            accepted_by_the_binary(line.split(" -- damselfly ", 1)[1].split(), "NOTES.txt")
    assert "bpftool cgroup tree /sys/fs/cgroup" in script
    assert "exec $POD -c agent -- damselfly status" in script


def test_manifests_readme_uninstall_uses_the_rendered_cleanup():
    """deploy/manifests/README.md tells how to clean up without Helm: the objects it names
    are the ones deploy/manifests/cleanup holds."""
    readme = (render.MANIFESTS / "README.md").read_text()
    cleanup = parse({"c": (render.MANIFESTS / "cleanup/cleanup.yaml").read_text()})
    job = next(o for o in cleanup if o["kind"] == "Job")["metadata"]["name"]
    assert "kubectl apply -k deploy/manifests/cleanup" in readme
    assert f"job/{job}" in readme
    assert "daemonset damselfly-agent" in readme
    kustomization = yaml.safe_load((render.MANIFESTS / "cleanup/kustomization.yaml").read_text())
    assert kustomization["resources"] == ["cleanup.yaml"]
    main = yaml.safe_load((render.MANIFESTS / "kustomization.yaml").read_text())
    assert "cleanup.yaml" not in main["resources"]
    for name in main["resources"]:
        docs = parse({"m": (render.MANIFESTS / name).read_text()})
        assert not hooks(docs), f"{name}: a post-delete hook would run at once with kubectl"


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_pod_gets_a_service_account_token(rendered, variant):
    """Nothing in Damselfly talks to the Kubernetes API: a token in a pod is only loot."""
    for o in rendered[variant]:
        spec = o.get("spec", {}).get("template", {}).get("spec")
        if spec:
            assert spec.get("automountServiceAccountToken") is False, o["metadata"]["name"]


def test_manifests_match_a_fresh_render():
    assert render.stale() == [], "deploy/manifests is stale: run `cargo xtask manifests`"
    kustomization = yaml.safe_load((render.MANIFESTS / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "damselfly"
    files = {p.name for p in render.MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
