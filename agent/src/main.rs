use clap::Parser;
use damselfly::cli::{Cli, Command, status};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DAMSELFLY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command {
        Command::Agent(args) => damselfly::agent::run(*args).await,
        Command::Ca(args) => damselfly::cli::ca::run(args),
        Command::Tracker(args) => {
            damselfly::tracker::server::run(args.listen, args.heartbeat).await
        }
        Command::Get(args) => damselfly::cli::get::run(args).await,
        Command::Preheat(args) => damselfly::cli::preheat::run(args).await,
        Command::Status(args) => {
            let s = status::fetch(args.admin).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::render(&s));
            }
            Ok(())
        }
    }
}
