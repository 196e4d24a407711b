//! `damselfly get`: one blob to a file, or a whole image to an OCI image
//! layout. Manifests come from the registry; blobs through the agent (so
//! from its cache or the swarm), each checked against its digest.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::{StreamExt, TryStreamExt, stream};
use indicatif::ProgressBar;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::{
    cli::transfer::{AgentFetch, AsyncSink, RegistryArgs, drain, progress, rate},
    oci::{BlobUrl, Descriptor, OCI_INDEX, Platform, Platforms, REF_NAME, Reference},
    origin::OriginRef,
    vocab::Digest,
};

/// Blobs downloaded at once.
const PARALLEL: usize = 3;

#[derive(Debug, Args)]
pub struct GetArgs {
    /// An image (host/repo:tag, host/repo@sha256:..., docker.io names) or a blob URL
    /// (https://host/v2/repo/blobs/sha256:...).
    pub target: String,
    /// For a blob URL: the file to write. For an image: the OCI image layout directory.
    #[arg(short, long)]
    pub output: PathBuf,
    /// The agent's admin URL; blobs come through it.
    #[arg(long, env = "DAMSELFLY_AGENT", default_value = "http://127.0.0.1:7402")]
    pub agent: String,
    /// Platform to take from a multi-platform image, os/arch[/variant] [default: this machine's].
    #[arg(long)]
    pub platform: Option<Platform>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub async fn run(args: GetArgs) -> anyhow::Result<()> {
    if args.target.starts_with("http://") || args.target.starts_with("https://") {
        get_blob(&args).await
    } else {
        get_image(&args).await
    }
}

async fn get_blob(args: &GetArgs) -> anyhow::Result<()> {
    let blob = BlobUrl::parse(&args.target)?;
    let registry = args.registry.client(&blob.origin().authority())?;
    let agent = AgentFetch::new(&args.agent, registry);
    let started = Instant::now();
    let pb = progress(0);
    pb.set_message(short(&blob.digest()));
    let n = download(&agent, &blob, None, &args.output, &pb).await?;
    pb.finish_and_clear();
    println!(
        "{}: {} -> {}",
        blob.digest(),
        rate(n, started.elapsed()),
        args.output.display()
    );
    Ok(())
}

async fn get_image(args: &GetArgs) -> anyhow::Result<()> {
    let reference = Reference::parse(&args.target)?;
    let registry = args.registry.client(&reference.registry)?;
    let platform = args.platform.clone().unwrap_or_else(Platform::host);
    let resolved = registry
        .resolve(
            &reference,
            args.registry.scheme(),
            &Platforms::One(platform.clone()),
        )
        .await
        .with_context(|| format!("resolving {reference}"))?;
    let image = resolved
        .images
        .first()
        .context("the registry named no image")?;

    let dir = &args.output;
    let blobs_dir = dir.join("blobs/sha256");
    tokio::fs::create_dir_all(&blobs_dir)
        .await
        .with_context(|| format!("creating {}", blobs_dir.display()))?;
    write_blob(&blobs_dir, &image.descriptor.digest, &image.bytes).await?;

    let started = Instant::now();
    let wanted: Vec<Descriptor> = image.manifest.blobs().cloned().collect();
    let total: u64 = wanted.iter().map(|d| d.size).sum();
    let pb = progress(total);
    pb.set_message(reference.to_string());
    let agent = Arc::new(AgentFetch::new(&args.agent, registry.clone()));
    let results: Vec<u64> = stream::iter(wanted.iter().cloned())
        .map(|d| {
            let (agent, pb, origin) = (agent.clone(), pb.clone(), resolved.origin.clone());
            let path = blobs_dir.join(d.digest.trim_start_matches("sha256:"));
            let repo = reference.repository.clone();
            async move { fetch_into(&agent, &origin, &repo, &d, &path, &pb).await }
        })
        .buffer_unordered(PARALLEL)
        .try_collect()
        .await?;
    pb.finish_and_clear();

    // index.json last: a layout without one is plainly unfinished.
    let mut descriptor = image.descriptor.clone();
    descriptor.annotations = reference
        .tag_or_default()
        .map(|t| [(REF_NAME.to_string(), t.to_string())].into());
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [descriptor],
    });
    write_file(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .await?;
    write_file(&dir.join("index.json"), &serde_json::to_vec_pretty(&index)?).await?;
    let shown = descriptor
        .platform
        .as_ref()
        .map(|p| format!(" ({p})"))
        .unwrap_or_default();
    println!(
        "{reference}{shown}: {} blobs, {} -> {}",
        results.len(),
        rate(results.iter().sum(), started.elapsed()),
        dir.display()
    );
    Ok(())
}

/// One blob of an image into the layout, unless a verified copy is there.
async fn fetch_into(
    agent: &AgentFetch,
    origin: &OriginRef,
    repo: &str,
    d: &Descriptor,
    path: &Path,
    pb: &ProgressBar,
) -> anyhow::Result<u64> {
    if tokio::fs::try_exists(path).await.unwrap_or(false) && file_digest(path).await? == d.digest {
        pb.inc(d.size);
        return Ok(0);
    }
    let blob = BlobUrl::new(origin, repo, &d.digest)?;
    download(agent, &blob, Some(d.size), path, pb).await
}

/// Stream a blob from the agent to `dest` through `dest.tmp`, checking size
/// and digest; nothing is left at `dest` unless both match.
async fn download(
    agent: &AgentFetch,
    blob: &BlobUrl,
    size: Option<u64>,
    dest: &Path,
    pb: &ProgressBar,
) -> anyhow::Result<u64> {
    let fetching = agent.fetch(blob).await?;
    if pb.length() == Some(0)
        && let Some(len) = fetching
            .resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        pb.set_length(len);
    }
    let tmp = PathBuf::from(format!("{}.tmp", dest.display()));
    let result = async {
        let file = tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut sink = HashingFile {
            file,
            hasher: Sha256::new(),
            path: &tmp,
        };
        let n = drain(fetching.resp, pb, &mut sink)
            .await
            .with_context(|| format!("downloading {blob}"))?;
        sink.file
            .sync_all()
            .await
            .with_context(|| format!("writing {}", tmp.display()))?;
        let got = Digest(sink.hasher.finalize().into()).to_string();
        if got != blob.digest() {
            bail!("{blob}: the bytes received hash to {got}; refusing them");
        }
        if let Some(s) = size
            && s != n
        {
            bail!("{blob}: {n} bytes received, the manifest says {s}");
        }
        tokio::fs::rename(&tmp, dest)
            .await
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        Ok(n)
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

struct HashingFile<'a> {
    file: tokio::fs::File,
    hasher: Sha256,
    path: &'a Path,
}

impl AsyncSink for HashingFile<'_> {
    async fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.hasher.update(data);
        self.file
            .write_all(data)
            .await
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

async fn file_digest(path: &Path) -> anyhow::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f =
            std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
        Ok(Digest(h.finalize().into()).to_string())
    })
    .await?
}

async fn write_blob(dir: &Path, digest: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unsupported digest {digest}"))?;
    write_file(&dir.join(hex), bytes).await
}

/// Whole-file replace: write aside, then rename over.
async fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    tokio::fs::write(&tmp, bytes)
        .await
        .with_context(|| format!("writing {}", tmp.display()))?;
    tokio::fs::rename(&tmp, path)
        .await
        .with_context(|| format!("renaming {}", tmp.display()))
}

/// `sha256:0123456789ab`, for progress lines and tables.
pub fn short(digest: &str) -> String {
    digest.chars().take(19).collect()
}
