//! Stub: being written.

#[derive(Debug, clap::Args)]
pub struct StackArgs {}
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {}

pub fn stack(_args: StackArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
pub fn cluster(_args: ClusterArgs) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
