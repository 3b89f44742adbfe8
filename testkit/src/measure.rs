//! Stub: being written.

/// Options of `stackctl measure`.
#[derive(Debug, clap::Args)]
pub struct MeasureArgs {}

pub fn run(_args: MeasureArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
