//! Stub: being written.

/// Options of `stackctl crash`.
#[derive(Debug, clap::Args)]
pub struct CrashArgs {}

pub fn run_cli(_args: CrashArgs) -> anyhow::Result<bool> {
    anyhow::bail!("not written yet")
}
