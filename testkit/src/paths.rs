//! Where the harness finds the repository's binaries and configuration files.

use std::path::{Path, PathBuf};

/// The repository root (the testkit crate's parent folder).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives in the repository")
        .to_owned()
}

/// `restate/restate.toml`: one node on a small machine.
pub fn single_node_config() -> PathBuf {
    repo_root().join("restate/restate.toml")
}

/// `restate/cluster/cluster.toml`: the settings every node of a cluster shares.
pub fn cluster_config() -> PathBuf {
    repo_root().join("restate/cluster/cluster.toml")
}

/// The native restate-server binary: `RESTATE_SERVER_BIN`, or the npm-installed one under
/// `scripts/restate/node_modules` (`scripts/install-restate.sh`). An npm `.bin` wrapper (a
/// Node script that spawns the native binary) is replaced by the binary it would run, so that
/// the pid the harness signals is the server's own.
pub fn restate_server() -> anyhow::Result<PathBuf> {
    native("RESTATE_SERVER_BIN", "restate-server")
}

/// The native `restatectl` binary (`RESTATECTL_BIN`, or the npm-installed one).
pub fn restatectl() -> anyhow::Result<PathBuf> {
    native("RESTATECTL_BIN", "restatectl")
}

fn native(var: &str, name: &str) -> anyhow::Result<PathBuf> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        other => other,
    };
    let package = format!(
        "@restatedev/{name}-{}-{arch}/bin/{name}",
        std::env::consts::OS
    );
    let bin = match env_path(var) {
        Some(configured) => configured,
        None => repo_root()
            .join("scripts/restate/node_modules")
            .join(&package),
    };
    let is_script = std::fs::read(&bin).is_ok_and(|bytes| bytes.starts_with(b"#!"));
    let bin = if is_script {
        // <...>/node_modules/.bin/<name> → <...>/node_modules/<package>
        let resolved = std::fs::canonicalize(&bin).unwrap_or_else(|_| bin.clone());
        bin.ancestors()
            .chain(resolved.ancestors())
            .filter(|p| p.file_name().is_some_and(|n| n == "node_modules"))
            .map(|nm| nm.join(&package))
            .find(|p| p.is_file())
            .unwrap_or(bin)
    } else {
        bin
    };
    anyhow::ensure!(
        bin.is_file(),
        "{name} not found at {} (run scripts/install-restate.sh, or set {var})",
        bin.display()
    );
    Ok(bin)
}

/// A binary of this workspace: `var` if set, else `name` next to the running executable (or
/// one folder up, for test binaries in `target/<profile>/deps/`).
pub fn workspace_bin(var: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = env_path(var) {
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    let found = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    found.ok_or_else(|| {
        anyhow::anyhow!(
            "{name} not found next to {} (build it, or set {var})",
            exe.display()
        )
    })
}

/// The payment-service binary (`PAYMENT_SERVICE_BIN`, or the build's own).
pub fn payment_service() -> anyhow::Result<PathBuf> {
    workspace_bin("PAYMENT_SERVICE_BIN", "payment-service")
}

/// The `mock-gateway` binary (`MOCK_GATEWAY_BIN`, or the workspace's): the simulated Stripe
/// as a process (`mock-gateway --help`; it prints `mock-gateway ready on http://<addr>` and
/// answers `GET /healthz` once it serves).
pub fn mock_gateway() -> anyhow::Result<PathBuf> {
    workspace_bin("MOCK_GATEWAY_BIN", "mock-gateway")
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}
