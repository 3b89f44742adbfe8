//! `stackctl`: the command line over the testkit. Every script in `scripts/` that starts,
//! breaks or measures a stack is a one-line wrapper of one of these subcommands.
//!
//! ```text
//! stackctl stack up                 restate-server + payment-service, registered; Ctrl-C stops all
//! stackctl cluster up               three nodes + payment-service; Ctrl-C stops all
//! stackctl cluster status|kill N|start N|stop N|wait-ready N|kill-service|start-service
//! stackctl bench [--scale] ...      the benchmark (README "Performance")
//! stackctl measure [SCENARIO...]    the cluster measurements (README "What survives what")
//! stackctl crash [--full] [--cluster] [--seed N] ...   the crash test (README "Crash test")
//! ```

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "stackctl",
    about = "Start, break and measure payment-service stacks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One restate-server and payment-service, in the foreground.
    Stack(testkit::cli::StackArgs),
    /// A local three-node Restate cluster and payment-service.
    Cluster(testkit::cli::ClusterArgs),
    /// The performance benchmark.
    Bench(testkit::bench::BenchArgs),
    /// The cluster measurements ("What survives what").
    Measure(testkit::measure::MeasureArgs),
    /// The crash test.
    Crash(testkit::crash::CrashArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Stack(args) => testkit::cli::stack(args),
        Command::Cluster(args) => testkit::cli::cluster(args),
        Command::Bench(args) => testkit::bench::run(args),
        Command::Measure(args) => testkit::measure::run(args),
        Command::Crash(args) => {
            let passed = testkit::crash::run_cli(args)?;
            std::process::exit(if passed { 0 } else { 1 })
        }
    }
}
