//! A real containerd per node, with CRI on and NO registry configuration at
//! all (no config_path, hosts.toml or mirrors): it reaches registries the way
//! a stock node does, which is what Damselfly must intercept. The one
//! exception is [`Containerd::start_with`] with a [`Mirror`]: the pull-through
//! cache setup that `dfly-bench` compares Damselfly against.
//!
//! The daemon runs inside the node (netns, cgroup, /etc/hosts) in a mount
//! namespace of its own (see [`Node::command`]), so whatever it mounts goes
//! away with it. Root, state, socket and the CNI dirs the CRI plugin insists
//! on all live under the testbed's dir; the native snapshotter mounts nothing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    agent::Agent,
    pki::TestCa,
    testbed::{Node, Proc, Testbed},
    tools,
    trust::Trust,
};

/// The containerd namespace CRI (kubelet) uses; `ctr_pull` uses it too.
pub const NAMESPACE: &str = "k8s.io";

/// A registry mirror in containerd's own `hosts.toml` form (`config_path`):
/// pulls of `registry` go to `url` first, then to the registry itself.
#[derive(Clone, Debug)]
pub struct Mirror {
    /// The registry host as image references name it, e.g. `registry.dfly.test`.
    pub registry: String,
    /// The mirror's base URL, e.g. `https://mirror.dfly.test`.
    pub url: String,
}

pub struct Containerd {
    pub node: Node,
    pub dir: PathBuf,
    pub sock: PathBuf,
    /// The only roots containerd and ctr trust (SSL_CERT_FILE).
    pub ca_bundle: PathBuf,
    empty_cert_dir: PathBuf,
    ctr_bin: PathBuf,
    pub proc: Proc,
}

impl Containerd {
    /// Start containerd in `node`, trusting exactly the PEM bundle `ca_bundle`.
    /// Returns once it answers on its socket.
    pub fn start(tb: &Testbed, node: &Node, ca_bundle: &Path) -> anyhow::Result<Self> {
        Self::start_with(tb, node, ca_bundle, None)
    }

    /// [`Containerd::start`] in `agent`'s node, trusting `public_ca` (the
    /// origin's issuer) and that agent's node CA, nothing else.
    pub fn start_for(tb: &Testbed, agent: &Agent, public_ca: &TestCa) -> anyhow::Result<Self> {
        let trust = Trust::bundle(tb, agent, public_ca)?;
        Self::start(tb, &agent.node, trust.roots())
    }

    /// [`Containerd::start`], optionally pulling through `mirror`.
    pub fn start_with(
        tb: &Testbed,
        node: &Node,
        ca_bundle: &Path,
        mirror: Option<&Mirror>,
    ) -> anyhow::Result<Self> {
        let bin = tools::need("containerd", "containerd")?;
        let ctr_bin = tools::need("ctr", "containerd")?;
        let dir = tb.dir.join(format!("containerd-n{}", node.index));
        let empty_cert_dir = dir.join("no-certs");
        for d in ["root", "state", "opt", "cni/bin", "cni/conf", "no-certs"] {
            fs::create_dir_all(dir.join(d))?;
        }
        let sock = dir.join("containerd.sock");
        let p = |s: &str| dir.join(s).display().to_string();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
plugin_dir = ""

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "pause.invalid/unused:0"
  disable_cgroup = true
  disable_apparmor = true
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"#,
            root = p("root"),
            state = p("state"),
            sock = sock.display(),
            ttrpc = p("containerd-ttrpc.sock"),
            opt = p("opt"),
            cni_bin = p("cni/bin"),
            cni_conf = p("cni/conf"),
        );
        let mut config = config;
        if let Some(m) = mirror {
            let certs = dir.join("certs.d");
            let host_dir = certs.join(&m.registry);
            fs::create_dir_all(&host_dir)?;
            fs::write(
                host_dir.join("hosts.toml"),
                format!(
                    "server = \"https://{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                    m.registry, m.url
                ),
            )?;
            config.push_str(&format!(
                "  [plugins.\"io.containerd.grpc.v1.cri\".registry]\n    config_path = \"{}\"\n",
                certs.display()
            ));
        }
        let cfg = dir.join("config.toml");
        fs::write(&cfg, config)?;
        let mut cmd = node.command(bin)?;
        tools::isolate_env(&mut cmd, ca_bundle, &empty_cert_dir);
        cmd.arg("--config").arg(&cfg);
        let proc = node.spawn(cmd, &dir.join("containerd.log"))?;
        let mut c = Self {
            node: node.clone(),
            dir,
            sock,
            ca_bundle: ca_bundle.to_path_buf(),
            empty_cert_dir,
            ctr_bin,
            proc,
        };
        c.wait_ready()?;
        Ok(c)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if !self.proc.running() {
                bail!("containerd exited during start:\n{}", self.proc.log_text());
            }
            if self.sock.exists()
                && self
                    .ctr()?
                    .arg("version")
                    .output()
                    .is_ok_and(|o| o.status.success())
                && self
                    .proc
                    .log_text()
                    .contains("containerd successfully booted")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("containerd not ready after 20 s:\n{}", self.proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ctr -a SOCK -n k8s.io` run inside the node, trusting only the bundle,
    /// unpacking with the native snapshotter.
    pub fn ctr(&self) -> anyhow::Result<Command> {
        let mut cmd = self.node.command(&self.ctr_bin)?;
        tools::isolate_env(&mut cmd, &self.ca_bundle, &self.empty_cert_dir);
        cmd.env("CONTAINERD_SNAPSHOTTER", "native")
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", NAMESPACE]);
        Ok(cmd)
    }

    fn ctr_out(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tools::run(self.ctr()?.args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr images pull [--user u:p] REF` inside the node: the pull runs in
    /// the `ctr` process itself (comm `ctr`), in the node's cgroup.
    pub fn ctr_pull(&self, reference: &str, creds: Option<(&str, &str)>) -> anyhow::Result<()> {
        let mut cmd = self.ctr()?;
        cmd.args(["images", "pull"]);
        if let Some((u, p)) = creds {
            cmd.args(["--user", &format!("{u}:{p}")]);
        }
        cmd.arg(reference);
        tools::run(&mut cmd)?;
        Ok(())
    }

    /// A kubelet-style `ImageService/PullImage` over CRI v1: the containerd
    /// daemon itself pulls (comm `containerd`). Returns the image ref (the
    /// image id, `sha256:<config digest>`).
    pub fn cri_pull(&self, reference: &str, creds: Option<(&str, &str)>) -> anyhow::Result<String> {
        use k8s_cri::v1::{AuthConfig, ImageSpec, PullImageRequest};
        let sock = self.sock.clone();
        let request = PullImageRequest {
            image: Some(ImageSpec {
                image: reference.to_string(),
                ..Default::default()
            }),
            auth: creds.map(|(u, p)| AuthConfig {
                username: u.to_string(),
                password: p.to_string(),
                ..Default::default()
            }),
            sandbox_config: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut client = cri_client(sock).await?;
            let resp = client
                .pull_image(request)
                .await
                .map_err(|s| anyhow::anyhow!("CRI PullImage: {} ({:?})", s.message(), s.code()))?;
            Ok(resp.into_inner().image_ref)
        })
    }

    /// Image names in the k8s.io namespace.
    pub fn images(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .ctr_out(&["images", "ls", "-q"])?
            .lines()
            .map(str::to_string)
            .collect())
    }

    pub fn has_image(&self, reference: &str) -> anyhow::Result<bool> {
        Ok(self.images()?.iter().any(|i| i == reference))
    }

    /// Digests in the content store.
    pub fn content(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .ctr_out(&["content", "ls", "-q"])?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Remove `reference`, every other name for the same manifest (CRI adds
    /// `repo@sha256:...` and `sha256:<id>`), and the content of that image,
    /// so the next pull downloads every blob again.
    pub fn remove_image(&self, reference: &str) -> anyhow::Result<()> {
        let listing = self.ctr_out(&["images", "ls"])?;
        let rows: Vec<(String, String)> = listing
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let name = f.next()?.to_string();
                let _media = f.next()?;
                Some((name, f.next()?.to_string()))
            })
            .collect();
        let target = rows
            .iter()
            .find(|(n, _)| n == reference)
            .map(|(_, d)| d.clone())
            .with_context(|| format!("no image {reference} in containerd:\n{listing}"))?;
        // The blobs the manifest names, read before the manifest goes.
        let manifest: serde_json::Value =
            serde_json::from_str(&self.ctr_out(&["content", "get", &target])?)
                .context("manifest JSON")?;
        let mut blobs = vec![target.clone()];
        blobs.extend(manifest["config"]["digest"].as_str().map(str::to_string));
        if let Some(layers) = manifest["layers"].as_array() {
            blobs.extend(
                layers
                    .iter()
                    .filter_map(|l| l["digest"].as_str().map(str::to_string)),
            );
        }
        let names: Vec<&str> = rows
            .iter()
            .filter(|(_, d)| *d == target)
            .map(|(n, _)| n.as_str())
            .collect();
        let mut args = vec!["images", "rm", "--sync"];
        args.extend(&names);
        self.ctr_out(&args)?;
        // GC (--sync) removes unreferenced content; remove what is left.
        let present = self.content()?;
        let left: Vec<&str> = blobs
            .iter()
            .map(String::as_str)
            .filter(|b| present.iter().any(|p| p == b))
            .collect();
        if !left.is_empty() {
            let mut args = vec!["content", "rm"];
            args.extend(&left);
            self.ctr_out(&args)?;
        }
        let present = self.content()?;
        if let Some(b) = blobs.iter().find(|b| present.contains(b)) {
            bail!("blob {b} still in containerd's content store after removing {reference}");
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }
}

/// A CRI v1 image service client on containerd's unix socket.
pub async fn cri_client(
    sock: PathBuf,
) -> anyhow::Result<k8s_cri::v1::image_service_client::ImageServiceClient<tonic::transport::Channel>>
{
    use hyper_util::rt::TokioIo;
    // The URI is required by tonic but unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:50051")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?))
            }
        }))
        .await
        .context("connecting to containerd's CRI socket")?;
    Ok(k8s_cri::v1::image_service_client::ImageServiceClient::new(
        channel,
    ))
}
