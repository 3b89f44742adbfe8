//! Shared harness for the integration tests: one Restate stack (restate-server
//! and payment-service, registered) per test binary, plus helpers to call the
//! `PaymentService` handlers through the ingress and to inspect the server
//! (admin SQL API) and the mock gateway's ledger.
//!
//! ```ignore
//! let app = common::stack();
//! let id = common::unique_id("walkthrough");
//! let (status, body) = app.create_payment(&id, &json!({"amount": 100, "customerId": "c"}));
//! ```
//!
//! Local mode (default) starts everything itself on free ports in a temp dir:
//! * `RESTATE_SERVER_BIN`: the server binary (default: the npm-installed one
//!   under `scripts/restate/node_modules`; its Node wrapper is bypassed for the
//!   native binary so that no orphan survives the tests);
//! * `PAYMENT_SERVICE_BIN`: the service binary (default: this build's
//!   `payment-service`);
//! * `<manifest>/restate/restate.toml` is passed with `--config-file` if present;
//! * `PAYMENT_TEST_KEEP_TMP=1` keeps the temp dir (logs, ledger, server data).
//!
//! External mode, when `PAYMENT_TEST_INGRESS_URL`, `PAYMENT_TEST_ADMIN_URL` and
//! `PAYMENT_TEST_SERVICE_URL` are all set: nothing is started, the service URL
//! (as the server sees it) is registered with `force`, and the tests run
//! against that stack. `PAYMENT_TEST_LEDGER` optionally names the gateway
//! ledger file; without it, ledger assertions are skipped.
//!
//! [`owned::OwnedStack`] is a stack owned by one test instead of the shared
//! one, whose server and service can be SIGKILLed and restarted in place (the
//! crash test); [`cluster::OwnedCluster`] is the same for a three-node Restate cluster.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod cluster;
pub mod owned;
pub mod process;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use reqwest::blocking::Client;
use serde::Deserialize;
use serde_json::{Value, json};

/// The Restate service name of the virtual object under test.
pub const SERVICE: &str = "PaymentService";

const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(60);
const SERVICE_READY_TIMEOUT: Duration = Duration::from_secs(30);
const REGISTER_ATTEMPTS: u32 = 40;
const START_ATTEMPTS: u32 = 3;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(25);

/// A running stack: where to reach it, and helpers to talk to it.
pub struct TestApp {
    /// Ingress base URL, e.g. `http://127.0.0.1:41234`.
    pub ingress: String,
    /// Admin base URL, e.g. `http://127.0.0.1:41235`.
    pub admin: String,
    /// The service deployment URL as registered with the server.
    pub service_url: String,
    /// The mock gateway's JSONL ledger, when known.
    pub ledger: Option<PathBuf>,
    /// Temp dir with logs (local mode only).
    pub dir: Option<PathBuf>,
    client: Client,
}

/// One line of the mock gateway's ledger.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    /// `"charge"` or `"refund"`.
    pub op: String,
    pub idempotency_key: String,
    pub payment_id: String,
    pub amount: i64,
    /// `"succeeded"` or `"declined"`.
    pub outcome: String,
    /// Charge or refund id, when succeeded.
    #[serde(default)]
    pub id: Option<String>,
    /// `true` when the gateway already knew the idempotency key.
    pub replay: bool,
}

/// One row of `sys_invocation` (the columns the tests look at).
#[derive(Debug, Clone, Deserialize)]
pub struct Invocation {
    pub id: String,
    pub target: String,
    pub target_service_key: String,
    pub target_handler_name: String,
    /// pending, scheduled, ready, running, paused, backing-off, suspended, completed
    pub status: String,
    #[serde(default)]
    pub retry_count: Option<u64>,
    #[serde(default)]
    pub last_failure: Option<String>,
    /// `success` or `failure`, once completed.
    #[serde(default)]
    pub completion_result: Option<String>,
    /// e.g. `[400] amount must be positive`.
    #[serde(default)]
    pub completion_failure: Option<String>,
}

/// The shared stack of this test binary, started on first use.
pub fn stack() -> &'static TestApp {
    static APP: OnceLock<Result<TestApp, String>> = OnceLock::new();
    match APP.get_or_init(|| start().map_err(|e| format!("{e:#}"))) {
        Ok(app) => app,
        Err(e) => panic!("the test stack failed to start:\n{e}"),
    }
}

/// A payment id unique to this run: `<prefix>-<uuid>`.
pub fn unique_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The seed README's CreatePayment body.
pub fn seed_payment() -> Value {
    json!({
        "amount": 10000,
        "currency": "USD",
        "description": "Premium subscription",
        "customerId": "cust-alice"
    })
}

/// Asserts an error answer: the expected status and a JSON body with a
/// non-empty `message`; returns the message.
#[track_caller]
pub fn assert_error(case: &str, got: &(u16, Value), status: u16) -> String {
    let (code, body) = got;
    assert_eq!(
        *code, status,
        "{case}: expected HTTP {status}, got {code}: {body}"
    );
    let message = body
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{case}: error body without a message: {body}"));
    assert!(
        !message.trim().is_empty(),
        "{case}: empty error message: {body}"
    );
    message.to_owned()
}

impl TestApp {
    // ---- PaymentService handlers -------------------------------------------

    /// `POST /PaymentService/<id>/<handler>` with a JSON body.
    pub fn call(&self, id: &str, handler: &str, body: &Value) -> (u16, Value) {
        self.call_raw(id, handler, Some(body.to_string()))
    }

    /// [`Self::call`] that reports a failed request (refused, reset, timed
    /// out) instead of panicking, e.g. while the server is restarting.
    pub fn try_call(&self, id: &str, handler: &str, body: &Value) -> Result<(u16, Value), String> {
        let url = format!("{}/{SERVICE}/{id}/{handler}", self.ingress);
        let resp = self
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().map_err(|e| format!("POST {url}: {e}"))?;
        Ok((status, parse_body(&text)))
    }

    /// Same with a raw body (`None`: no body and no content-type at all).
    pub fn call_raw(&self, id: &str, handler: &str, body: Option<String>) -> (u16, Value) {
        let url = format!("{}/{SERVICE}/{id}/{handler}", self.ingress);
        let mut req = self.client.post(&url);
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req.send().unwrap_or_else(|e| {
            // A timeout usually means the invocation is being retried (a
            // non-terminal error): show what the server knows about it.
            let sql = format!(
                "SELECT id, target, status, retry_count, last_failure FROM sys_invocation \
                 WHERE target_service_name = '{SERVICE}' AND target_service_key = {}",
                sql_str(id)
            );
            let invocations = self
                .try_query(&sql)
                .map(|rows| Value::Array(rows).to_string())
                .unwrap_or_else(|e| e);
            panic!("POST {url} failed: {e}\ninvocations of {id}: {invocations}")
        });
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .unwrap_or_else(|e| panic!("POST {url}: reading the body failed: {e}"));
        (status, parse_body(&text))
    }

    pub fn create_payment(&self, id: &str, body: &Value) -> (u16, Value) {
        self.call(id, "CreatePayment", body)
    }

    /// GetPayment with `{}` as the body (as in the seed README).
    pub fn get_payment(&self, id: &str) -> (u16, Value) {
        self.call(id, "GetPayment", &json!({}))
    }

    /// GetPayment without any body.
    pub fn get_payment_no_body(&self, id: &str) -> (u16, Value) {
        self.call_raw(id, "GetPayment", None)
    }

    pub fn refund(&self, id: &str, body: &Value) -> (u16, Value) {
        self.call(id, "RefundPayment", body)
    }

    /// Creates a payment that must complete; returns the CreatePayment answer.
    #[track_caller]
    pub fn completed_payment(&self, id: &str, amount: i64) -> Value {
        let got = self.create_payment(
            id,
            &json!({"amount": amount, "currency": "USD", "description": "test", "customerId": "cust-test"}),
        );
        assert_eq!(got.0, 200, "CreatePayment {id}: {}", got.1);
        assert_eq!(
            got.1["status"], "completed",
            "CreatePayment {id}: {}",
            got.1
        );
        got.1
    }

    // ---- admin API -----------------------------------------------------------

    /// Runs SQL on the admin query API; returns the rows.
    #[track_caller]
    pub fn query(&self, sql: &str) -> Vec<Value> {
        self.try_query(sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::query`] without panicking.
    pub fn try_query(&self, sql: &str) -> Result<Vec<Value>, String> {
        let url = format!("{}/query", self.admin);
        let resp = self
            .client
            .post(&url)
            .header("accept", "application/json")
            .json(&json!({ "query": sql }))
            .send()
            .map_err(|e| format!("query {sql:?}: POST {url} failed: {e}"))?;
        let status = resp.status();
        let text = resp.text().unwrap_or_default();
        if !status.is_success() {
            return Err(format!("query {sql:?}: HTTP {status}: {text}"));
        }
        let body: Value = serde_json::from_str(&text)
            .map_err(|e| format!("query {sql:?}: bad JSON ({e}): {text}"))?;
        match body.get("rows") {
            Some(Value::Array(rows)) => Ok(rows.clone()),
            _ => Err(format!("query {sql:?}: no rows array: {text}")),
        }
    }

    /// `sys_invocation` rows of the PaymentService invocations matching the
    /// SQL condition `filter` (e.g. `target_handler_name = 'CreatePayment'`).
    pub fn query_invocations(&self, filter: &str) -> Vec<Invocation> {
        let sql = format!(
            "SELECT id, target, target_service_key, target_handler_name, status, retry_count, \
             last_failure, completion_result, completion_failure FROM sys_invocation \
             WHERE target_service_name = '{SERVICE}' AND ({filter})"
        );
        self.query(&sql)
            .into_iter()
            .map(|row| {
                serde_json::from_value(row.clone())
                    .unwrap_or_else(|e| panic!("unexpected sys_invocation row ({e}): {row}"))
            })
            .collect()
    }

    /// All PaymentService invocations of one payment (virtual object key).
    pub fn invocations(&self, payment_id: &str) -> Vec<Invocation> {
        self.query_invocations(&format!("target_service_key = {}", sql_str(payment_id)))
    }

    /// The payment's Restate state: key → value parsed as JSON (a value that
    /// isn't valid UTF-8 JSON is returned as `Value::String` of its text, or
    /// `Null`).
    pub fn state(&self, payment_id: &str) -> BTreeMap<String, Value> {
        let sql = format!(
            "SELECT key, value_utf8 FROM state WHERE service_name = '{SERVICE}' \
             AND service_key = {}",
            sql_str(payment_id)
        );
        self.query(&sql)
            .into_iter()
            .map(|row| {
                let key = row["key"].as_str().unwrap_or_default().to_owned();
                let value = match row.get("value_utf8").and_then(Value::as_str) {
                    Some(text) => serde_json::from_str(text)
                        .unwrap_or_else(|_| Value::String(text.to_owned())),
                    None => Value::Null,
                };
                (key, value)
            })
            .collect()
    }

    // ---- mock gateway ledger -------------------------------------------------

    /// Ledger lines of one payment, or `None` (after saying so on stderr) when
    /// this stack has no ledger to read.
    pub fn ledger_entries(&self, payment_id: &str) -> Option<Vec<LedgerEntry>> {
        let Some(path) = &self.ledger else {
            eprintln!(
                "no gateway ledger for this stack: skipping ledger assertions for {payment_id}"
            );
            return None;
        };
        Some(
            read_ledger(path)
                .into_iter()
                .filter(|e| e.payment_id == payment_id)
                .collect(),
        )
    }

    /// Log tails of the local stack, for failure messages.
    pub fn logs(&self) -> String {
        let Some(dir) = &self.dir else {
            return "<external stack: no logs>".into();
        };
        let mut out = String::new();
        for name in ["restate-server.log", "payment-service.log"] {
            out.push_str(&format!(
                "--- {name} ---\n{}\n",
                process::tail(&dir.join(name), 40)
            ));
        }
        out
    }
}

/// A SQL string literal.
pub fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn parse_body(text: &str) -> Value {
    if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
    }
}

fn read_ledger(path: &Path) -> Vec<LedgerEntry> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("reading the ledger {}: {e}", path.display()),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad ledger line ({e}): {l}")))
        .collect()
}

fn http_client(timeout: Duration) -> anyhow::Result<Client> {
    Ok(Client::builder()
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(2))
        .build()?)
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

// ---- startup -----------------------------------------------------------------

fn start() -> anyhow::Result<TestApp> {
    let external = (
        env_nonempty("PAYMENT_TEST_INGRESS_URL"),
        env_nonempty("PAYMENT_TEST_ADMIN_URL"),
        env_nonempty("PAYMENT_TEST_SERVICE_URL"),
    );
    if let (Some(ingress), Some(admin), Some(service_url)) = external {
        return start_external(ingress, admin, service_url);
    }
    process::install_exit_hook();
    start_local()
}

fn start_external(ingress: String, admin: String, service_url: String) -> anyhow::Result<TestApp> {
    let app = TestApp {
        ingress: ingress.trim_end_matches('/').to_owned(),
        admin: admin.trim_end_matches('/').to_owned(),
        service_url,
        ledger: env_nonempty("PAYMENT_TEST_LEDGER").map(PathBuf::from),
        dir: None,
        client: http_client(REQUEST_TIMEOUT)?,
    };
    eprintln!(
        "external stack: ingress {}, admin {}, service {}",
        app.ingress, app.admin, app.service_url
    );
    let probe = http_client(Duration::from_secs(2))?;
    wait_until(
        SERVER_READY_TIMEOUT,
        "the external Restate server to be healthy",
        || Ok(healthy(&probe, &app.admin, &app.ingress)),
    )?;
    register(&probe, &app.admin, &app.service_url, &|| Ok(()))?;
    wait_for_ingress(&probe, &app.ingress)?;
    Ok(app)
}

/// Starts restate-server and the service (their spawns happen on the
/// harness's spawner thread, see [`process::spawn_logged`]).
fn start_local() -> anyhow::Result<TestApp> {
    let dir = process::temp_dir().context("creating the temp dir")?;
    let probe = http_client(Duration::from_secs(2))?;

    let (ingress, admin) = start_server(&dir, &probe)?;
    let (service_url, service_pid, ledger) = start_service(&dir)?;

    let service_log = dir.join("payment-service.log");
    let service_alive = || match process::exited(service_pid) {
        Some(status) => Err(anyhow!(
            "payment-service exited ({status}):\n{}",
            process::tail(&service_log, 40)
        )),
        None => Ok(()),
    };
    register(&probe, &admin, &service_url, &service_alive).with_context(|| {
        format!(
            "registering {service_url}\n--- payment-service.log ---\n{}\n--- restate-server.log ---\n{}",
            process::tail(&service_log, 40),
            process::tail(&dir.join("restate-server.log"), 40)
        )
    })?;
    wait_for_ingress(&probe, &ingress)?;
    eprintln!(
        "test stack up: ingress {ingress}, admin {admin}, service {service_url}, dir {}",
        dir.display()
    );
    Ok(TestApp {
        ingress,
        admin,
        service_url,
        ledger: Some(ledger),
        dir: Some(dir),
        client: http_client(REQUEST_TIMEOUT)?,
    })
}

/// The restate-server binary; an npm `.bin` wrapper (a Node script that
/// spawns the native binary) is replaced by the native binary it would run,
/// so that signals and PDEATHSIG reach the real server.
fn server_binary() -> PathBuf {
    let configured = env_nonempty("RESTATE_SERVER_BIN").map(PathBuf::from);
    let bin = configured.unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts/restate/node_modules/.bin/restate-server")
    });
    let is_script = std::fs::read(&bin)
        .map(|bytes| bytes.starts_with(b"#!"))
        .unwrap_or(false);
    if !is_script {
        return bin;
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        other => other,
    };
    let native = format!(
        "@restatedev/restate-server-{}-{arch}/bin/restate-server",
        std::env::consts::OS
    );
    // <...>/node_modules/.bin/restate-server → <...>/node_modules/<native>
    let resolved = std::fs::canonicalize(&bin).unwrap_or_else(|_| bin.clone());
    let candidates = bin
        .ancestors()
        .chain(resolved.ancestors())
        .filter(|p| p.file_name().is_some_and(|n| n == "node_modules"))
        .map(|nm| nm.join(&native))
        .collect::<Vec<_>>();
    candidates.into_iter().find(|p| p.is_file()).unwrap_or(bin)
}

/// The ports of one restate-server: kept across restarts, so that a killed
/// server comes back where the clients and the service expect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ServerPorts {
    ingress: u16,
    admin: u16,
    node: u16,
}

impl ServerPorts {
    fn free() -> std::io::Result<Self> {
        Ok(Self {
            ingress: process::free_port()?,
            admin: process::free_port()?,
            node: process::free_port()?,
        })
    }

    fn ingress_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ingress)
    }

    fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }
}

/// The restate-server binary, checked to exist.
fn checked_server_binary() -> anyhow::Result<PathBuf> {
    let bin = server_binary();
    anyhow::ensure!(
        bin.exists(),
        "restate-server not found at {} (set RESTATE_SERVER_BIN or install it under scripts/restate)",
        bin.display()
    );
    Ok(bin)
}

/// Spawns restate-server with its data in `base_dir`, listening on `ports`
/// (with `<manifest>/restate/restate.toml` if present, and `extra_env` added to
/// its environment); returns its pid.
fn spawn_server(
    bin: &Path,
    base_dir: &Path,
    ports: ServerPorts,
    log: &Path,
    extra_env: &[(String, String)],
) -> anyhow::Result<u32> {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("restate/restate.toml");
    let mut cmd = Command::new(bin);
    cmd.arg("--base-dir").arg(base_dir).arg("--no-logo");
    if config.is_file() {
        cmd.arg("--config-file").arg(&config);
    }
    cmd.env(
        "RESTATE_INGRESS__BIND_ADDRESS",
        format!("127.0.0.1:{}", ports.ingress),
    )
    .env(
        "RESTATE_ADMIN__BIND_ADDRESS",
        format!("127.0.0.1:{}", ports.admin),
    )
    .env("RESTATE_BIND_ADDRESS", format!("127.0.0.1:{}", ports.node))
    .env("RESTATE_LOG_DISABLE_ANSI_CODES", "true")
    .envs(extra_env.iter().map(|(k, v)| (k, v)));
    process::spawn_logged(cmd, log).with_context(|| format!("spawning {}", bin.display()))
}

/// Waits until the server `pid` is healthy on its admin and ingress ports.
fn wait_server(probe: &Client, pid: u32, ports: ServerPorts) -> anyhow::Result<()> {
    let (admin, ingress) = (ports.admin_url(), ports.ingress_url());
    wait_until(SERVER_READY_TIMEOUT, "restate-server to be healthy", || {
        if let Some(status) = process::exited(pid) {
            bail!("restate-server exited early ({status})");
        }
        Ok(healthy(probe, &admin, &ingress))
    })
}

fn start_server(dir: &Path, probe: &Client) -> anyhow::Result<(String, String)> {
    let bin = checked_server_binary()?;
    let log = dir.join("restate-server.log");
    let mut last_error = None;
    for attempt in 1..=START_ATTEMPTS {
        let ports = ServerPorts::free()?;
        let base_dir = dir.join(format!("restate-data-{attempt}"));
        let pid = spawn_server(&bin, &base_dir, ports, &log, &[])?;
        match wait_server(probe, pid, ports) {
            Ok(()) => return Ok((ports.ingress_url(), ports.admin_url())),
            Err(e) => {
                eprintln!("restate-server start attempt {attempt} failed: {e:#}");
                process::stop(pid);
                last_error = Some(e);
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| anyhow!("no attempt made"))
        .context(format!(
            "--- restate-server.log ---\n{}",
            process::tail(&log, 60)
        )))
}

/// The payment-service binary.
fn service_binary() -> String {
    env_nonempty("PAYMENT_SERVICE_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_payment-service").to_owned())
}

/// The service command, listening on `addr` with its gateway ledger at
/// `ledger` and `RUST_LOG` (default `info`); callers add the gateway's settings.
fn service_command(bin: &str, addr: SocketAddr, ledger: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--bind")
        .arg(addr.to_string())
        .env_remove("BIND_ADDR")
        .env("GATEWAY_LEDGER", ledger)
        .env(
            "RUST_LOG",
            env_nonempty("RUST_LOG").unwrap_or_else(|| "info".into()),
        );
    cmd
}

/// The payment-service of a test stack that kills and restarts it: what it needs to start again
/// on the same port and ledger, and its pid while it runs. Used by [`owned::OwnedStack`] and
/// [`cluster::Cluster`].
pub struct ServiceProcess {
    bin: String,
    pub addr: SocketAddr,
    env: Vec<(String, String)>,
    pub ledger: PathBuf,
    pub log: PathBuf,
    /// `None` while it is down.
    pub pid: Mutex<Option<u32>>,
}

impl ServiceProcess {
    /// Not started yet: see [`ServiceProcess::start`].
    pub fn new(
        addr: SocketAddr,
        env: Vec<(String, String)>,
        ledger: PathBuf,
        log: PathBuf,
    ) -> Self {
        Self {
            bin: service_binary(),
            addr,
            env,
            ledger,
            log,
            pid: Mutex::new(None),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        *lock(&self.pid)
    }

    /// SIGKILLs the service (a crash: no graceful shutdown); `false` if it was not running.
    pub fn kill(&self) -> bool {
        lock(&self.pid).take().and_then(process::kill).is_some()
    }

    /// Starts the service (it must be down); returns once it accepts connections, with how
    /// long that took.
    pub fn start(&self) -> anyhow::Result<Duration> {
        let mut slot = lock(&self.pid);
        anyhow::ensure!(slot.is_none(), "payment-service is already running");
        let began = Instant::now();
        *slot = Some(spawn_service(
            &self.bin,
            self.addr,
            &self.ledger,
            &self.env,
            &self.log,
        )?);
        Ok(began.elapsed())
    }
}

/// Locks `m`, also after a panic in another test thread poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Spawns the service with `env` added, its output appended to `log`, and waits until it accepts
/// connections on `addr`; on failure it is killed and the error carries the log's tail.
fn spawn_service(
    bin: &str,
    addr: SocketAddr,
    ledger: &Path,
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<u32> {
    let mut cmd = service_command(bin, addr, ledger);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let pid = process::spawn_logged(cmd, log).with_context(|| format!("spawning {bin}"))?;
    if let Err(e) = wait_service(pid, addr) {
        process::kill(pid);
        return Err(e.context(format!(
            "--- {} ---\n{}",
            log.display(),
            process::tail(log, 40)
        )));
    }
    Ok(pid)
}

/// Waits until the service `pid` accepts connections on `addr`.
fn wait_service(pid: u32, addr: SocketAddr) -> anyhow::Result<()> {
    wait_until(SERVICE_READY_TIMEOUT, "payment-service to listen", || {
        if let Some(status) = process::exited(pid) {
            bail!("payment-service exited early ({status})");
        }
        Ok(process::tcp_accepts(addr))
    })
}

/// Starts payment-service; returns its URL, pid and ledger path.
fn start_service(dir: &Path) -> anyhow::Result<(String, u32, PathBuf)> {
    let bin = service_binary();
    let ledger = dir.join("gateway-ledger.jsonl");
    let log = dir.join("payment-service.log");
    let mut last_error = None;
    for attempt in 1..=START_ATTEMPTS {
        let port = process::free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cmd = service_command(&bin, addr, &ledger);
        cmd.env("GATEWAY_DELAY_MS", "5")
            .env("GATEWAY_DECLINE_RATE", "0");
        let pid = process::spawn_logged(cmd, &log).with_context(|| format!("spawning {bin}"))?;
        match wait_service(pid, addr) {
            Ok(()) => return Ok((format!("http://{addr}"), pid, ledger)),
            Err(e) => {
                eprintln!("payment-service start attempt {attempt} failed: {e:#}");
                process::stop(pid);
                last_error = Some(e);
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| anyhow!("no attempt made"))
        .context(format!(
            "--- payment-service.log ---\n{}",
            process::tail(&log, 60)
        )))
}

fn healthy(probe: &Client, admin: &str, ingress: &str) -> bool {
    let ok = |url: String| {
        probe
            .get(url)
            .send()
            .is_ok_and(|r| r.status().as_u16() == 200)
    };
    ok(format!("{admin}/health")) && ok(format!("{ingress}/restate/health"))
}

/// `POST /deployments {uri, force: true}`, retried while the service is not
/// accepting yet; `alive` aborts early when the service died.
fn register(
    probe: &Client,
    admin: &str,
    service_url: &str,
    alive: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let url = format!("{admin}/deployments");
    let body = json!({ "uri": service_url, "force": true });
    let mut last = String::new();
    for attempt in 1..=REGISTER_ATTEMPTS {
        alive()?;
        match probe
            .post(&url)
            .timeout(Duration::from_secs(20))
            .json(&body)
            .send()
        {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) => {
                let status = resp.status();
                last = format!("HTTP {status}: {}", resp.text().unwrap_or_default());
            }
            Err(e) => last = format!("{e}"),
        }
        std::thread::sleep(Duration::from_millis(50 * u64::from(attempt.min(10))));
    }
    bail!("registering {service_url} at {url} failed {REGISTER_ATTEMPTS} times; last: {last}")
}

/// Waits until the ingress lists PaymentService (the registration has reached it).
fn wait_for_ingress(probe: &Client, ingress: &str) -> anyhow::Result<()> {
    let url = format!("{ingress}/restate/health");
    wait_until(
        Duration::from_secs(20),
        "the ingress to know PaymentService",
        || {
            let Ok(resp) = probe.get(&url).send() else {
                return Ok(false);
            };
            let body: Value = resp.json().unwrap_or(Value::Null);
            Ok(body["services"]
                .as_array()
                .is_some_and(|s| s.iter().any(|n| n == SERVICE)))
        },
    )
}

/// Polls `ready` every [`POLL`] until it says `true`, fails, or `timeout`.
fn wait_until(
    timeout: Duration,
    what: &str,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

// ---- shared assertions ---------------------------------------------------------

/// Asserts `value[field]` is an RFC 3339 timestamp in UTC; returns it.
#[track_caller]
pub fn assert_utc_timestamp(value: &Value, field: &str) -> time::OffsetDateTime {
    let text = value[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string: {value}"));
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{field} = {text:?} is not RFC 3339 ({e}): {value}"));
    assert!(
        at.offset().is_utc(),
        "{field} = {text:?} is not UTC: {value}"
    );
    at
}

/// Asserts a non-empty string field; returns it.
#[track_caller]
pub fn assert_nonempty_str<'a>(value: &'a Value, field: &str) -> &'a str {
    let s = value[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string: {value}"));
    assert!(!s.is_empty(), "{field} is empty: {value}");
    s
}

/// Asserts a field is absent (not even `null`).
#[track_caller]
pub fn assert_absent(value: &Value, field: &str) {
    assert!(
        value.get(field).is_none(),
        "{field} should be absent: {value}"
    );
}

/// Asserts that every PaymentService invocation on these payments has
/// finished: status `completed`, never retried, and a failure (if any) is a
/// terminal one with a 4xx code. Returns the invocations seen.
#[track_caller]
pub fn assert_all_settled(app: &TestApp, payment_ids: &[String]) -> Vec<Invocation> {
    if payment_ids.is_empty() {
        return Vec::new();
    }
    let keys = payment_ids
        .iter()
        .map(|id| sql_str(id))
        .collect::<Vec<_>>()
        .join(", ");
    let invocations = app.query_invocations(&format!("target_service_key IN ({keys})"));
    for inv in &invocations {
        assert_eq!(
            inv.status, "completed",
            "invocation left unfinished (a bad request must fail terminally, not be retried): {inv:?}"
        );
        assert!(
            inv.retry_count.unwrap_or(0) == 0,
            "invocation was retried: {inv:?}"
        );
        assert!(
            inv.last_failure.is_none(),
            "invocation had a failed attempt: {inv:?}"
        );
        if inv.completion_result.as_deref() == Some("failure") {
            let failure = inv.completion_failure.as_deref().unwrap_or_default();
            assert!(
                failure.starts_with("[4"),
                "invocation failed with a non-4xx terminal error: {inv:?}"
            );
        }
    }
    invocations
}
