use clap::Parser;
use damselfly::{
    cli::{Cli, Command, status},
    telemetry::{Identity, Telemetry},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = match &cli.command {
        Command::Agent(a) => Telemetry::init(
            a.otlp_endpoint.as_deref(),
            &Identity {
                service: "damselfly-agent",
                node: a
                    .node_name
                    .clone()
                    .unwrap_or_else(damselfly::agent::hostname),
                instance: Some(a.instance.clone()),
            },
        ),
        Command::Tracker(t) => Telemetry::init(
            t.otlp_endpoint.as_deref(),
            &Identity {
                service: "damselfly-tracker",
                node: damselfly::agent::hostname(),
                instance: None,
            },
        ),
        _ => Telemetry::logs_only(),
    }?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Agent(args) => damselfly::agent::run(*args).await,
        Command::Ca(args) => damselfly::cli::ca::run(args),
        Command::Tracker(args) => damselfly::cli::tracker::run(args).await,
        Command::Get(args) => damselfly::cli::get::run(args).await,
        Command::Preheat(args) => damselfly::cli::preheat::run(args).await,
        Command::Cleanup(args) => damselfly::cli::cleanup::run(args).await,
        Command::CleanupWait(args) => damselfly::cli::cleanup::wait::run(args).await,
        Command::Status(args) => {
            let s = status::fetch(args.admin).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::render(&s));
            }
            Ok(())
        }
    };
    // After SIGTERM too: the last spans of a stopping agent are often the
    // interesting ones.
    telemetry.shutdown().await;
    result
}
