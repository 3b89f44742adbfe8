//! localstripe (PyPI, pinned in `scripts/localstripe/requirements.txt`): a stateful fake of
//! Stripe's API that no one here wrote, for the Stripe adapter's conformance test. Started on
//! a free port, ready once it answers an authenticated request.
//!
//! What it is not: it ignores idempotency keys, has no search
//! (`GET /v1/payment_intents/search` answers 404), does not cap refunds at what was charged,
//! and answers a decline as 402 `invalid_request_error` `card_declined` without a decline code.
//! It knows Stripe's test payment methods `pm_card_visa` (succeeds) and
//! `pm_card_chargeCustomerFail` (declined when charged), and cards created with
//! `POST /v1/payment_methods` (number 4000000000000341 is declined). It keeps its state in
//! `/tmp/localstripe.pickle` (a fixed path); started `--from-scratch`, it never reads it back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;

use crate::paths::repo_root;
use crate::ports;
use crate::process::Proc;
use crate::stack::wait_until;

/// Any key of the form `sk_…` will do for localstripe.
pub const API_KEY: &str = "sk_test_localstripe";
/// A payment method localstripe declines when charged.
pub const DECLINED_PAYMENT_METHOD: &str = "pm_card_chargeCustomerFail";
/// How long it may take to answer after start (a Python interpreter on a busy 2-core machine).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The localstripe executable: `LOCALSTRIPE_BIN`, or the one `scripts/install-localstripe.sh`
/// installs under `scripts/localstripe/venv`.
pub fn bin() -> anyhow::Result<PathBuf> {
    let bin = std::env::var_os("LOCALSTRIPE_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("scripts/localstripe/venv/bin/localstripe"));
    anyhow::ensure!(
        bin.is_file(),
        "localstripe not found at {} (run scripts/install-localstripe.sh, or set LOCALSTRIPE_BIN)",
        bin.display()
    );
    Ok(bin)
}

/// A running localstripe, stopped when dropped.
pub struct Localstripe {
    proc: Proc,
    port: u16,
}

impl Localstripe {
    /// Starts one on a free port, its log at `<dir>/localstripe.log`, and waits until it serves.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let port = ports::pick()?;
        let mut cmd = Command::new(bin()?);
        cmd.args(["--port", &port.to_string(), "--from-scratch"])
            // Its log as it happens, not when Python's buffer fills.
            .env("PYTHONUNBUFFERED", "1");
        let mut proc = Proc::spawn("localstripe", cmd, &dir.join("localstripe.log"))?;
        let probe = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let url = format!("http://127.0.0.1:{port}/v1/balance");
        let waited = wait_until(READY_TIMEOUT, "localstripe to answer", || {
            if let Some(status) = proc.exited() {
                anyhow::bail!("localstripe exited with {status}");
            }
            Ok(probe
                .get(&url)
                .bearer_auth(API_KEY)
                .send()
                .is_ok_and(|r| r.status().is_success()))
        });
        if let Err(e) = waited {
            let log = proc.tail(30);
            return Err(e).with_context(|| format!("starting localstripe; its log:\n{log}"));
        }
        Ok(Self { proc, port })
    }

    /// Its API base, as the Stripe client takes it (`http://127.0.0.1:<port>`).
    pub fn api_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log(&self) -> &Path {
        self.proc.log()
    }

    /// The last lines of its log (the requests it served).
    pub fn tail(&self, lines: usize) -> String {
        self.proc.tail(lines)
    }
}
