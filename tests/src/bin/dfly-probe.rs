//! Test client and origin server for the end-to-end tests (see `probe`).

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use damselfly_testbed::probe;

#[derive(Parser)]
struct Cli {
    /// Run with this process name (comm), e.g. `ctr`, to match a steering rule.
    #[arg(long, global = true)]
    comm: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// GET a URL and print one JSON line: status, bytes, sha256, peer.
    Get {
        url: String,
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Extra request header, `Name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
    },
    /// Open and close `count` TCP connections to `addr` (connect cost benchmark).
    Connect {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: u32,
    },
    /// Serve /bytes/<n> and /peer.
    Serve {
        #[arg(long, value_delimiter = ',')]
        http: Vec<SocketAddr>,
        #[arg(long, value_delimiter = ',')]
        https: Vec<SocketAddr>,
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Before any thread exists: comm is per thread and the kernel checks the connecting one.
    if let Some(comm) = &cli.comm {
        probe::set_comm(comm)?;
    }
    match cli.cmd {
        Cmd::Get { url, ca, headers } => {
            let r = probe::get_with(&url, ca.as_deref(), &headers).unwrap_or_else(|e| {
                probe::GetResult {
                    error: Some(format!("{e:#}")),
                    ..Default::default()
                }
            });
            println!("{}", serde_json::to_string(&r)?);
            if r.error.is_some() {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Connect { addr, count } => {
            for _ in 0..count {
                drop(std::net::TcpStream::connect(addr)?);
            }
            Ok(())
        }
        Cmd::Serve {
            http,
            https,
            cert,
            key,
        } => {
            let tls = cert.as_deref().zip(key.as_deref());
            probe::serve(&http, &https, tls)
        }
    }
}
