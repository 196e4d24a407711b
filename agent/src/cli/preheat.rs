//! `damselfly preheat`: have every seed fetch an image's blobs (through its
//! `/v1/fetch`, so into its cache and announced to the swarm) before a rollout.

use std::{
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::{StreamExt, stream};
use indicatif::HumanBytes;

use crate::{
    cli::{
        ClusterPkiArgs,
        get::short,
        transfer::{AgentFetch, Discard, RegistryArgs, drain, progress, rate},
    },
    oci::{BlobUrl, Descriptor, Platform, Platforms, Reference, RegistryClient},
    origin::OriginClient,
    swarm::PeerTls,
};

#[derive(Debug, Args)]
pub struct PreheatArgs {
    /// The image: host/repo:tag, host/repo@sha256:..., docker.io names.
    pub reference: String,
    /// Seed agents' admin URLs: https://HOST:7402 from anywhere in the cluster
    /// (mutual TLS with --cluster-*; the chart's seeds are
    /// `FULLNAME-seed-N.FULLNAME-seed:7402`, FULLNAME being the release name
    /// if it contains "damselfly", else RELEASE-damselfly), or http:// on the
    /// seed's own node.
    #[arg(
        long = "seed",
        env = "DAMSELFLY_SEED_ADMIN",
        value_delimiter = ',',
        required = true
    )]
    pub seeds: Vec<String>,
    /// Platform to take from a multi-platform image, os/arch[/variant] [default: this machine's].
    #[arg(long, conflicts_with = "all_platforms")]
    pub platform: Option<Platform>,
    /// Every platform of a multi-platform image.
    #[arg(long)]
    pub all_platforms: bool,
    /// Blob fetches in flight at once, over all seeds.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The cluster certificate that https:// seeds require of their callers.
    #[command(flatten)]
    pub cluster: ClusterPkiArgs,
}

/// How one seed did with one blob.
enum Outcome {
    Fetched(Duration),
    Cached(Duration),
    Failed(String),
}

pub async fn run(args: PreheatArgs) -> anyhow::Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let registry = args.registry.client(&reference.registry)?;
    let platforms = if args.all_platforms {
        Platforms::All
    } else {
        Platforms::One(args.platform.clone().unwrap_or_else(Platform::host))
    };
    let resolved = registry
        .resolve(&reference, args.registry.scheme(), &platforms)
        .await
        .with_context(|| format!("resolving {reference}"))?;
    let blobs = resolved.blobs();
    // An https:// seed is reached with the cluster's mutual TLS: the seed
    // serves blobs to nobody else from off the node.
    let to_seeds = if args.seeds.iter().any(|s| s.starts_with("https://")) {
        let pki = args
            .cluster
            .load("an https:// --seed", crate::pki::Role::Peer)?;
        let tls = PeerTls::new(&pki)?.tls_client(b"http/1.1")?;
        Arc::new(RegistryClient::new(
            OriginClient::with_tls(tls),
            args.registry.credential(&reference.registry)?,
        ))
    } else {
        registry.clone()
    };
    let seeds: Vec<Arc<AgentFetch>> = args
        .seeds
        .iter()
        .map(|s| Arc::new(AgentFetch::new(s, to_seeds.clone())))
        .collect();

    let started = Instant::now();
    let total: u64 = blobs.iter().map(|d| d.size).sum::<u64>() * seeds.len() as u64;
    let pb = progress(total);
    pb.set_message(reference.to_string());
    let jobs: Vec<(usize, usize)> = (0..blobs.len())
        .flat_map(|b| (0..seeds.len()).map(move |s| (b, s)))
        .collect();
    let results: Vec<(usize, usize, Outcome)> = stream::iter(jobs)
        .map(|(b, s)| {
            let (seed, d, pb) = (seeds[s].clone(), blobs[b].clone(), pb.clone());
            let blob = BlobUrl::new(&resolved.origin, &reference.repository, &d.digest);
            async move {
                let t0 = Instant::now();
                let outcome = match blob {
                    Err(e) => Outcome::Failed(e.to_string()),
                    Ok(blob) => match warm(&seed, &blob, &d, &pb).await {
                        Ok(true) => Outcome::Cached(t0.elapsed()),
                        Ok(false) => Outcome::Fetched(t0.elapsed()),
                        Err(e) => Outcome::Failed(format!("{e:#}")),
                    },
                };
                (b, s, outcome)
            }
        })
        .buffer_unordered(args.parallel.max(1))
        .collect()
        .await;
    pb.finish_and_clear();

    let mut grid: Vec<Vec<Option<Outcome>>> = (0..blobs.len())
        .map(|_| (0..seeds.len()).map(|_| None).collect())
        .collect();
    for (b, s, o) in results {
        grid[b][s] = Some(o);
    }
    print!("{}", table(&blobs, &args.seeds, &grid));
    let failed_everywhere = grid
        .iter()
        .filter(|row| {
            row.iter()
                .all(|o| matches!(o, Some(Outcome::Failed(_)) | None))
        })
        .count();
    let moved: u64 = grid
        .iter()
        .zip(&blobs)
        .map(|(row, d)| {
            row.iter()
                .filter(|o| matches!(o, Some(Outcome::Fetched(_))))
                .count() as u64
                * d.size
        })
        .sum();
    println!(
        "{reference}: {} blobs on {} seed{}; fetched {}",
        blobs.len(),
        seeds.len(),
        if seeds.len() == 1 { "" } else { "s" },
        rate(moved, started.elapsed())
    );
    if failed_everywhere > 0 {
        bail!(
            "{failed_everywhere} of {} blobs could not be preheated on any seed",
            blobs.len()
        );
    }
    Ok(())
}

/// Fetch one blob through one seed, discarding the bytes; `true` if the seed
/// had it already.
async fn warm(
    seed: &AgentFetch,
    blob: &BlobUrl,
    d: &Descriptor,
    pb: &indicatif::ProgressBar,
) -> anyhow::Result<bool> {
    let fetching = seed.fetch(blob).await?;
    let n = drain(fetching.resp, pb, &mut Discard)
        .await
        .with_context(|| format!("{blob} from {}", seed.base))?;
    if n != d.size {
        bail!("{n} bytes, the manifest says {}", d.size);
    }
    Ok(fetching.cached)
}

/// BLOB, SIZE, then one column per seed: the time it took, `cached`, or
/// `error`; the errors in full below the table.
fn table(blobs: &[Descriptor], seeds: &[String], grid: &[Vec<Option<Outcome>>]) -> String {
    let mut head = vec!["BLOB".to_string(), "SIZE".to_string()];
    head.extend(seeds.iter().cloned());
    let mut rows = vec![head];
    let mut errors = String::new();
    for (d, row) in blobs.iter().zip(grid) {
        let mut cells = vec![short(&d.digest), HumanBytes(d.size).to_string()];
        for (seed, o) in seeds.iter().zip(row) {
            cells.push(match o {
                Some(Outcome::Fetched(t)) => format!("{:.2}s", t.as_secs_f64()),
                Some(Outcome::Cached(t)) => format!("cached {:.2}s", t.as_secs_f64()),
                Some(Outcome::Failed(e)) => {
                    let _ = writeln!(errors, "{} on {seed}: {e}", short(&d.digest));
                    "error".to_string()
                }
                None => "-".to_string(),
            });
        }
        rows.push(cells);
    }
    let cols = rows[0].len();
    let width: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    if !errors.is_empty() {
        out.push('\n');
        out.push_str(&errors);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_each_seed_and_lists_errors() {
        let d = |hex: char, size| Descriptor {
            media_type: "x".into(),
            digest: format!("sha256:{}", hex.to_string().repeat(64)),
            size,
            platform: None,
            annotations: None,
        };
        let seeds = vec!["http://s0:7402".to_string(), "http://s1:7402".to_string()];
        let grid = vec![
            vec![
                Some(Outcome::Fetched(Duration::from_millis(1500))),
                Some(Outcome::Cached(Duration::from_millis(20))),
            ],
            vec![
                Some(Outcome::Failed("401 Unauthorized".into())),
                Some(Outcome::Failed("connection refused".into())),
            ],
        ];
        let text = table(&[d('a', 2048), d('b', 10)], &seeds, &grid);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("BLOB ") && lines[0].contains("http://s1:7402"),
            "{text}"
        );
        assert!(
            lines[1].contains("2.00 KiB")
                && lines[1].contains("1.50s")
                && lines[1].contains("cached 0.02s"),
            "{text}"
        );
        assert!(lines[2].contains("error"), "{text}");
        assert!(
            text.contains("sha256:bbbbbbbbbbbb on http://s0:7402: 401 Unauthorized"),
            "{text}"
        );
    }
}
