//! `orchestrator-bench <name>`: benchmarks of the running system. Each prints its figures
//! and the machine; see `docs/benchmarks/`.

use clap::{Parser, Subcommand};

mod gateway;

#[derive(Parser)]
#[command(
    name = "orchestrator-bench",
    about = "Benchmarks of the running system."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Signed webhook deliveries per second into the gateway's inbox (SQLite), with p50/p99
    /// latency, driven from this process against a gateway in a child process.
    Gateway(gateway::Args),
    /// The gateway under test (started by `gateway`; not meant to be run by hand).
    #[command(hide = true)]
    GatewayServer(gateway::ServerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Gateway(args) => runtime.block_on(gateway::run(args)),
        Command::GatewayServer(args) => runtime.block_on(gateway::server(args)),
    }
}
