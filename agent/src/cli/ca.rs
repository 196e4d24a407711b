//! `damselfly ca show | install | uninstall | rotate` (to be written).

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the node CA certificate (PEM) on stdout.
    Show,
}

pub fn run(_args: CaArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
