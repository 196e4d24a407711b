//! What `get` and `preheat` share: registry credentials and client, blob
//! fetches through an agent's `/v1/fetch`, progress and byte counts.

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Args;
use http_body_util::BodyExt;
use hyper::{HeaderMap, Response, body::Incoming, header};
use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::{
    admin::{CACHE_HEADER, fetch_uri},
    oci::{BlobUrl, ClientError, Credential, RegistryClient, error_message},
    origin::{OriginClient, OriginError},
};

#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Registry credentials, USER:PASSWORD [default: the docker config's entry for the registry].
    #[arg(long, env = "DAMSELFLY_CREDS", hide_env_values = true)]
    pub creds: Option<String>,
    /// Docker config.json to take credentials from [default: ~/.docker/config.json].
    #[arg(long, env = "DAMSELFLY_DOCKER_CONFIG")]
    pub docker_config: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for the registry, besides the system roots.
    #[arg(long, env = "DAMSELFLY_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Talk to the registry over plain HTTP (for image references; a blob URL says its scheme).
    #[arg(long)]
    pub plain_http: bool,
}

impl RegistryArgs {
    pub fn scheme(&self) -> &'static str {
        if self.plain_http { "http" } else { "https" }
    }

    /// `--creds`, else the docker config's entry for `registry` (as a
    /// reference names it: `docker.io`, `host[:port]`), else anonymous.
    pub fn credential(&self, registry: &str) -> anyhow::Result<Option<Credential>> {
        if let Some(c) = &self.creds {
            return Ok(Some(Credential::parse(c)?));
        }
        let path = match &self.docker_config {
            Some(p) => p.clone(),
            None => match std::env::var_os("HOME") {
                Some(home) => Path::new(&home).join(".docker/config.json"),
                None => return Ok(None),
            },
        };
        Ok(Credential::from_docker_config(&path, registry)?)
    }

    pub fn client(&self, registry: &str) -> anyhow::Result<Arc<RegistryClient>> {
        let upstream = OriginClient::new(self.upstream_ca.as_deref()).context("registry client")?;
        Ok(Arc::new(RegistryClient::new(
            upstream,
            self.credential(registry)?,
        )))
    }
}

/// An agent's admin endpoint, fetching blobs with the client's credentials.
pub struct AgentFetch {
    /// e.g. `http://127.0.0.1:7402`.
    pub base: String,
    pub registry: Arc<RegistryClient>,
}

/// A 2xx blob response and whether the agent had the blob cached already.
pub struct Fetching {
    pub resp: Response<Incoming>,
    pub cached: bool,
}

impl AgentFetch {
    pub fn new(base: &str, registry: Arc<RegistryClient>) -> Self {
        let base = if base.contains("://") {
            base.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", base.trim_end_matches('/'))
        };
        Self { base, registry }
    }

    pub async fn fetch(&self, blob: &BlobUrl) -> anyhow::Result<Fetching> {
        let uri = fetch_uri(&self.base, blob)
            .with_context(|| format!("agent address {:?} is not a URL", self.base))?;
        let what = format!("{} (through the agent at {})", blob.host, self.base);
        let resp = match self.registry.get(&what, uri, &HeaderMap::new()).await {
            Ok(r) => r,
            Err(ClientError::Unreachable { source, .. }) => {
                // The upstream client's own wording speaks of "the origin"; here it is the agent.
                let cause = match source {
                    OriginError::Request(e) => anyhow::Error::new(e),
                    other => anyhow::Error::new(other),
                };
                return Err(cause.context(format!(
                    "no agent answers at {} (is `damselfly agent` running there? see --agent)",
                    self.base
                )));
            }
            Err(e) => return Err(e.into()),
        };
        if !resp.status().is_success() {
            let status = resp.status();
            bail!(
                "{blob}: {what} answered {status}: {}",
                error_message(resp).await
            );
        }
        let cached = resp.headers().get(CACHE_HEADER).is_some_and(|v| v == "hit");
        Ok(Fetching { resp, cached })
    }
}

/// Feed every body chunk to `sink`, counting on `progress`; returns the byte count.
pub async fn drain(
    resp: Response<Incoming>,
    progress: &ProgressBar,
    sink: &mut impl AsyncSink,
) -> anyhow::Result<u64> {
    let expected = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the agent's stream broke off")?;
        if let Ok(data) = frame.into_data() {
            sink.write(&data).await?;
            n += data.len() as u64;
            progress.inc(data.len() as u64);
        }
    }
    if let Some(e) = expected
        && e != n
    {
        bail!("the agent sent {n} of {e} bytes");
    }
    Ok(n)
}

/// Where a blob's bytes go: a file (hashed on the way), or nowhere.
pub trait AsyncSink {
    fn write(&mut self, data: &[u8]) -> impl Future<Output = anyhow::Result<()>>;
}

pub struct Discard;

impl AsyncSink for Discard {
    async fn write(&mut self, _: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A byte progress bar on stderr, drawn only when stdout is a terminal
/// (in a script or a Job, the one-line summary is enough).
pub fn progress(total: u64) -> ProgressBar {
    let target = if std::io::stdout().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let pb = ProgressBar::with_draw_target(Some(total), target);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:20!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb
}

/// `61.2 MiB in 1.35s (45.3 MiB/s)`.
pub fn rate(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    format!(
        "{} in {} ({}/s)",
        HumanBytes(bytes),
        if elapsed < Duration::from_secs(60) {
            format!("{secs:.2}s")
        } else {
            HumanDuration(elapsed).to_string()
        },
        HumanBytes((bytes as f64 / secs) as u64)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_well() {
        assert_eq!(
            rate(3 << 20, Duration::from_millis(1500)),
            "3.00 MiB in 1.50s (2.00 MiB/s)"
        );
    }

    #[test]
    fn agent_addresses_without_a_scheme_are_http() {
        let c = Arc::new(RegistryClient::new(OriginClient::new(None).unwrap(), None));
        assert_eq!(
            AgentFetch::new("127.0.0.1:7402/", c.clone()).base,
            "http://127.0.0.1:7402"
        );
        assert_eq!(
            AgentFetch::new("http://seed-0:7402", c).base,
            "http://seed-0:7402"
        );
    }
}
