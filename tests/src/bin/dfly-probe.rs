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
        /// `GET` or `HEAD`.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Connect to this address instead of the URL's host, which stays
        /// the `Host` and the SNI.
        #[arg(long)]
        connect: Option<SocketAddr>,
    },
    /// Open and close `count` TCP connections to `addr` (connect cost benchmark).
    Connect {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: u32,
    },
    /// Serve /bytes/<n> and /peer (or, with --redirect-https or --record, every path).
    Serve {
        #[arg(long, value_delimiter = ',')]
        http: Vec<SocketAddr>,
        #[arg(long, value_delimiter = ',')]
        https: Vec<SocketAddr>,
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
        /// Answer every request with 301 to https on the same host and path.
        #[arg(long, conflicts_with = "record")]
        redirect_https: bool,
        /// Write every connection and request head to this file (JSON
        /// lines) and answer every request 200.
        #[arg(long)]
        record: Option<PathBuf>,
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
        Cmd::Get {
            url,
            ca,
            headers,
            method,
            connect,
        } => {
            let how = probe::Get {
                method: Some(method),
                headers,
                connect,
                ca,
            };
            let r = probe::request(&url, &how).unwrap_or_else(|e| probe::GetResult {
                error: Some(format!("{e:#}")),
                ..Default::default()
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
            redirect_https,
            record,
        } => {
            let tls = cert.as_deref().zip(key.as_deref());
            let how = match (redirect_https, record) {
                (_, Some(file)) => probe::Serve::Record(file),
                (true, None) => probe::Serve::RedirectHttps,
                (false, None) => probe::Serve::Bytes,
            };
            probe::serve(&http, &https, tls, &how)
        }
    }
}
