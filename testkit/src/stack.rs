//! A stack: restate-server, as one node or an N-node cluster (the same code starts both), and
//! payment-service (plus any other deployment, e.g. the benchmark's floor), registered. Every
//! process can be SIGKILLed and started again in place: a node on its ports and data, the
//! service on its port and gateway ledger.
//!
//! The gateway is the service's in-process mock by default. With
//! [`StackBuilder::gateway_process`] it is one more process of the stack: `mock-gateway` (a
//! simulated Stripe) on a port of its own, with its database and audit ledger in the stack's
//! folder, and the service pointed at it as at Stripe (`--gateway stripe --stripe-api-base
//! http://127.0.0.1:<port>`); it is killed and started again like the others
//! ([`Stack::kill_gateway`], [`Stack::start_gateway`]), and [`Stack::ledger`] is its ledger.
//!
//! ```ignore
//! let stack = Stack::builder().nodes(3).gateway(MockConfig { .. }).start()?;
//! stack.kill_node(1)?;
//! stack.start_node(1)?;      // same ports and data; returns once it serves invocations again
//! stack.kill_service();
//! stack.start_service()?;    // Restate retries its invocations into the new process
//! ```
//!
//! A node is *ready* when its admin API and ingress answer `/health` and an invocation goes
//! through its ingress end to end: `GetPayment` of a `probe-…` ID answers the handler's own 404.
//! A restarted node answers health checks before it can run invocations, and its ingress
//! answers 404 "service not found" until it has loaded the registered services. The readiness
//! flags ([`Stack::ready_flags`]) are what a client-side load balancer would know; the
//! stack's [`PaymentClient`] routes retries by them.
//!
//! Dropping the stack stops everything.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use payment_service::gateway::{ApiKey, MockConfig, StripeConfig};
use serde_json::json;

use crate::admin::Admin;
use crate::client::{BlockingClient, GET, PaymentClient, is_not_found};
use crate::process::{self, GRACE, Restartable};
use crate::{paths, ports};

/// Prefix of the readiness probes' payment IDs: never a payment.
pub const PROBE_PREFIX: &str = "probe-";
/// Replication of logs and partitions on a cluster of more than one node.
pub const CLUSTER_REPLICATION: usize = 2;

/// How long a node may take to be ready, at start and after a restart (a busy 2-core machine
/// running three nodes can be slow).
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the first registration may take (a new cluster is still provisioning).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(120);
const SERVICE_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The secret key the stack's `mock-gateway` requires and the service sends (a test key: it
/// opens nothing but the stack's own gateway).
pub const GATEWAY_API_KEY: &str = "sk_test_testkit_stack";
/// Invocations a readiness check sends (different keys: different partitions).
const READY_PROBES: usize = 3;
/// Attempts at bringing a new stack up (fresh ports and data each time).
const START_ATTEMPTS: u32 = 3;

/// The ports of one node, kept across its restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePorts {
    pub ingress: u16,
    pub admin: u16,
    /// Node-to-node (and metadata, restatectl) address.
    pub node: u16,
}

impl NodePorts {
    fn pick() -> anyhow::Result<Self> {
        Ok(Self {
            ingress: ports::pick()?,
            admin: ports::pick()?,
            node: ports::pick()?,
        })
    }
}

/// A deployment besides payment-service, e.g. the benchmark's floor, or another build of the
/// service (an upgrade).
#[derive(Debug, Clone)]
pub struct ExtraService {
    pub name: String,
    pub bin: PathBuf,
    pub args: Vec<String>,
    /// A payment-service build's deployment version: it gets `--deployment-version=<v>` and its
    /// URL ends in `/<v>`. `None` for an endpoint that serves under any path (the floor).
    pub version: Option<String>,
    /// Registered when the stack starts; `false`: started only, for the test to register
    /// ([`Stack::register`]), as a new build is.
    pub register: bool,
}

/// What to start (see [`Stack::builder`]).
#[derive(Debug, Clone)]
pub struct StackBuilder {
    nodes: usize,
    config: Option<Option<PathBuf>>,
    server_env: Vec<(String, String)>,
    service_bin: Option<PathBuf>,
    gateway: MockConfig,
    service_env: Vec<(String, String)>,
    service_args: Vec<String>,
    identity_keys: Vec<String>,
    deployment_version: Option<String>,
    extras: Vec<ExtraService>,
    dir: Option<PathBuf>,
    fixed_ports: Option<(Vec<NodePorts>, u16)>,
    cluster_name: Option<String>,
    with_ledger: bool,
    gateway_process: bool,
    gateway_port: Option<u16>,
    gateway_env: Vec<(String, String)>,
    webhook_secret: Option<String>,
}

impl StackBuilder {
    /// Restate nodes: 1 (the default) or a cluster (3: replication [`CLUSTER_REPLICATION`]).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n.max(1);
        self
    }

    /// restate-server's configuration file; `None` for Restate's stock settings. Default:
    /// `restate/restate.toml` for one node, `restate/cluster/cluster.toml` for a cluster.
    pub fn config(mut self, file: Option<PathBuf>) -> Self {
        self.config = Some(file);
        self
    }

    /// Adds a variable to every node's environment (e.g. a request-signing key).
    pub fn server_env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.server_env.push((name.to_owned(), value.into()));
        self
    }

    /// The payment-service binary (default: [`paths::payment_service`]).
    pub fn service_bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.service_bin = Some(bin.into());
        self
    }

    /// The service's mock gateway; its ledger defaults to `<dir>/gateway-ledger.jsonl`.
    /// (The benchmark runs it without one: see [`Self::without_ledger`].)
    pub fn gateway(mut self, gateway: MockConfig) -> Self {
        self.gateway = gateway;
        self
    }

    /// No gateway ledger: the gateway keeps its keys in memory only (and forgets them when the
    /// service restarts), with no fsync per call. For measurements of the service, never for
    /// a stack that kills the service. With [`Self::gateway_process`], `mock-gateway` then
    /// also keeps its database in memory (no fsync per call either).
    pub fn without_ledger(mut self) -> Self {
        self.with_ledger = false;
        self
    }

    /// The gateway as a process of its own: `mock-gateway` with the settings of
    /// [`Self::gateway`] (but `response_delay`, which it does not have), its database
    /// (`mock-gateway.sqlite`) and ledger (`mock-gateway-ledger.jsonl`, unless the settings name
    /// one) in the stack's folder, and the service started with `--gateway stripe` against it.
    pub fn gateway_process(mut self) -> Self {
        self.gateway_process = true;
        self
    }

    /// With [`Self::gateway_process`]: its port (default: a free one).
    pub fn gateway_port(mut self, port: u16) -> Self {
        self.gateway_port = Some(port);
        self
    }

    /// With [`Self::gateway_process`]: `mock-gateway` sends its webhooks, signed with `secret`,
    /// to the first node's ingress (`/StripeWebhooks/Receive`), and the service verifies them
    /// with it.
    pub fn webhooks(mut self, secret: &str) -> Self {
        self.webhook_secret = Some(secret.to_owned());
        self.service_env("STRIPE_WEBHOOK_SECRET", secret)
    }

    /// With [`Self::gateway_process`]: adds a variable to `mock-gateway`'s environment.
    pub fn gateway_env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.gateway_env.push((name.to_owned(), value.into()));
        self
    }

    /// Adds a variable to the service's environment (e.g. `RUST_LOG`).
    pub fn service_env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.service_env.push((name.to_owned(), value.into()));
        self
    }

    /// More flags for the service, after the mock gateway's (e.g.
    /// `StripeConfig::to_args`, which chooses the Stripe gateway).
    pub fn service_args(mut self, args: impl IntoIterator<Item = String>) -> Self {
        self.service_args.extend(args);
        self
    }

    /// The service serves only requests signed with one of these keys.
    pub fn identity_keys(mut self, keys: Vec<String>) -> Self {
        self.identity_keys = keys;
        self
    }

    /// The service's deployment version (its URL's path; see `Config::deployment_version`).
    /// Default: [`build_version`] of its binary, so a new build is a new deployment.
    pub fn deployment_version(mut self, version: impl Into<String>) -> Self {
        self.deployment_version = Some(version.into());
        self
    }

    /// Another deployment to start and (if it says so) register; it gets `--bind <addr>`.
    pub fn extra_service(mut self, extra: ExtraService) -> Self {
        self.extras.push(extra);
        self
    }

    /// Where data and logs go (default: a temporary folder, removed at exit).
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Fixed ports instead of random ones: one entry per node, and the service's port (the
    /// extra services get the ports after it).
    pub fn fixed_ports(mut self, nodes: Vec<NodePorts>, service: u16) -> Self {
        self.fixed_ports = Some((nodes, service));
        self
    }

    pub fn cluster_name(mut self, name: impl Into<String>) -> Self {
        self.cluster_name = Some(name.into());
        self
    }

    /// Starts the nodes, the service and the extra services, registers them once, and
    /// returns when every node serves invocations.
    pub fn start(self) -> anyhow::Result<Stack> {
        let dir = match &self.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                dir.clone()
            }
            None => process::temp_dir("payment-stack-")?,
        };
        let attempts = if self.fixed_ports.is_some() {
            1
        } else {
            START_ATTEMPTS
        };
        let mut last = None;
        for attempt in 1..=attempts {
            let stack = self.assemble(&dir)?;
            match stack.bring_up() {
                Ok(()) => return Ok(stack),
                Err(e) => {
                    eprintln!("testkit: stack start attempt {attempt} failed: {e:#}");
                    stack.stop();
                    // A folder of our own starts again empty; a given one keeps its data.
                    if self.dir.is_none() {
                        let _ = std::fs::remove_dir_all(dir.join("restate-data"));
                        if let Some(ledger) = &stack.ledger {
                            let _ = std::fs::remove_file(ledger);
                        }
                        if let Some(gateway) = &stack.gateway {
                            gateway.remove_db();
                        }
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
    }

    fn assemble(&self, dir: &Path) -> anyhow::Result<Stack> {
        let (node_ports, service_port) = match &self.fixed_ports {
            Some((nodes, service)) => {
                anyhow::ensure!(nodes.len() == self.nodes, "one set of ports per node");
                (nodes.clone(), *service)
            }
            None => (
                (0..self.nodes)
                    .map(|_| NodePorts::pick())
                    .collect::<anyhow::Result<_>>()?,
                ports::pick()?,
            ),
        };
        let cluster_name = self.cluster_name.clone().unwrap_or_else(|| {
            format!(
                "payment-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            )
        });
        let nodes = self.node_processes(dir, &node_ports, &cluster_name)?;
        let default_ledger = if self.gateway_process {
            "mock-gateway-ledger.jsonl"
        } else {
            "gateway-ledger.jsonl"
        };
        let ledger = self.with_ledger.then(|| {
            self.gateway
                .ledger
                .clone()
                .unwrap_or_else(|| dir.join(default_ledger))
        });
        let gateway = if self.gateway_process {
            let port = match self.gateway_port {
                Some(port) => port,
                None => ports::pick()?,
            };
            let webhook_url = format!(
                "http://127.0.0.1:{}/StripeWebhooks/Receive",
                node_ports[0].ingress
            );
            Some(self.gateway_proc(dir, port, ledger.as_deref(), webhook_url)?)
        } else {
            None
        };
        let service =
            self.service_process(dir, service_port, ledger.as_deref(), gateway.as_ref())?;
        let extras = self
            .extras
            .iter()
            .enumerate()
            .map(|(k, extra)| {
                let port = match &self.fixed_ports {
                    Some(_) => service_port + 1 + k as u16,
                    None => ports::pick()?,
                };
                Ok(Deployment::new(
                    &extra.name,
                    extra.bin.clone(),
                    extra.args.clone(),
                    Vec::new(),
                    port,
                    extra.version.as_deref(),
                    dir,
                )
                .registered(extra.register))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ingresses: Vec<String> = node_ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{}", p.ingress))
            .collect();
        let ready: Arc<Vec<AtomicBool>> =
            Arc::new(nodes.iter().map(|_| AtomicBool::new(false)).collect());
        Ok(Stack {
            dir: dir.to_owned(),
            cluster_name,
            client: PaymentClient::with_up_flags(ingresses.clone(), ready.clone()),
            probe: BlockingClient::new(
                PaymentClient::new(ingresses).with_timeout(Duration::from_secs(10)),
            ),
            nodes,
            ready,
            service,
            gateway,
            extras,
            ledger,
        })
    }

    /// `mock-gateway`, not started: [`Self::gateway`]'s settings as its flags.
    fn gateway_proc(
        &self,
        dir: &Path,
        port: u16,
        ledger: Option<&Path>,
        webhook_url: String,
    ) -> anyhow::Result<GatewayProc> {
        let bin = paths::mock_gateway()?;
        let g = &self.gateway;
        anyhow::ensure!(
            g.response_delay.is_zero(),
            "mock-gateway has no response delay (its --drop-response-rate loses answers instead)"
        );
        // In memory without a ledger (see `without_ledger`): no fsync per call.
        let db = ledger.map(|_| dir.join("mock-gateway.sqlite"));
        let mut args = vec![
            format!("--bind=127.0.0.1:{port}"),
            format!(
                "--key-retention={}",
                humantime::format_duration(g.key_retention)
            ),
            format!("--api-key={GATEWAY_API_KEY}"),
        ];
        args.extend(g.behaviour_args(""));
        if let Some(db) = &db {
            args.push(format!("--db={}", db.display()));
        }
        if let Some(ledger) = ledger {
            args.push(format!("--ledger={}", ledger.display()));
        }
        if g.ignore_idempotency_keys {
            // Exists only in a fault-injection build of mock-gateway.
            args.push("--unsafe-ignore-idempotency-keys".to_owned());
        }
        let mut env = self.gateway_env.clone();
        if let Some(secret) = &self.webhook_secret {
            env.push(("MOCK_GATEWAY_WEBHOOK_URL".to_owned(), webhook_url));
            env.push(("MOCK_GATEWAY_WEBHOOK_SECRET".to_owned(), secret.clone()));
        }
        let proc = Restartable::new("mock-gateway", dir.join("mock-gateway.log"), move || {
            let mut cmd = Command::new(&bin);
            // Its own variables must not leak in from the caller's environment.
            for (var, _) in std::env::vars_os()
                .filter(|(k, _)| k.to_string_lossy().starts_with("MOCK_GATEWAY_"))
            {
                cmd.env_remove(var);
            }
            cmd.args(&args)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .envs(env.iter().map(|(k, v)| (k, v)));
            cmd
        });
        Ok(GatewayProc {
            proc,
            port,
            url: format!("http://127.0.0.1:{port}"),
            db,
        })
    }

    /// The restate-server nodes, not started: the same command for one node and for each of a
    /// cluster's, told every node's address (the metadata store's members).
    fn node_processes(
        &self,
        dir: &Path,
        ports: &[NodePorts],
        cluster: &str,
    ) -> anyhow::Result<Vec<Node>> {
        let server_bin = paths::restate_server()?;
        let config = match &self.config {
            Some(file) => file.clone(),
            None if self.nodes == 1 => Some(paths::single_node_config()),
            None => Some(paths::cluster_config()),
        };
        let metadata = json!(
            ports
                .iter()
                .map(|p| format!("http://127.0.0.1:{}", p.node))
                .collect::<Vec<_>>()
        )
        .to_string();
        let data = dir.join("restate-data");
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, &ports)| {
                let name = format!("node-{}", i + 1);
                let mut env = vec![
                    ("RESTATE_LOG_DISABLE_ANSI_CODES", "true".to_owned()),
                    ("RESTATE_CLUSTER_NAME", cluster.to_owned()),
                    // Only node 1 provisions the cluster (once: restarted, it finds it).
                    ("RESTATE_AUTO_PROVISION", (i == 0).to_string()),
                    ("RESTATE_BIND_ADDRESS", format!("127.0.0.1:{}", ports.node)),
                    (
                        "RESTATE_ADVERTISED_ADDRESS",
                        format!("http://127.0.0.1:{}", ports.node),
                    ),
                    (
                        "RESTATE_INGRESS__BIND_ADDRESS",
                        format!("127.0.0.1:{}", ports.ingress),
                    ),
                    (
                        "RESTATE_ADMIN__BIND_ADDRESS",
                        format!("127.0.0.1:{}", ports.admin),
                    ),
                    ("RESTATE_METADATA_CLIENT__ADDRESSES", metadata.clone()),
                ];
                if self.nodes > 1 {
                    env.push((
                        "RESTATE_DEFAULT_REPLICATION",
                        CLUSTER_REPLICATION.to_string(),
                    ));
                }
                let mut env: Vec<(String, String)> =
                    env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                env.extend(self.server_env.iter().cloned());
                let (bin, base, config, node_name) = (
                    server_bin.clone(),
                    data.clone(),
                    config.clone(),
                    name.clone(),
                );
                let proc = Restartable::new(&name, dir.join(format!("{name}.log")), move || {
                    let mut cmd = Command::new(&bin);
                    cmd.arg("--base-dir")
                        .arg(&base)
                        .args(["--node-name", &node_name, "--no-logo"])
                        // TCP only: unix sockets under a long temp path exceed the path limit.
                        .args(["--listen-mode", "tcp"])
                        // RUST_LOG is meant for payment-service.
                        .env_remove("RUST_LOG")
                        .envs(env.iter().map(|(k, v)| (k, v)));
                    if let Some(config) = &config {
                        cmd.arg("--config-file").arg(config);
                    }
                    cmd
                });
                Node { name, ports, proc }
            })
            .collect();
        Ok(nodes)
    }

    /// payment-service, not started: its gateway (ledger at `ledger`) and keys as flags.
    fn service_process(
        &self,
        dir: &Path,
        port: u16,
        ledger: Option<&Path>,
        gateway: Option<&GatewayProc>,
    ) -> anyhow::Result<Deployment> {
        let bin = match &self.service_bin {
            Some(bin) => bin.clone(),
            None => paths::payment_service()?,
        };
        let mut args = match gateway {
            // The service's side of the gateway process: Stripe's API at its address.
            Some(gateway) => StripeConfig {
                api_base: gateway.url.clone(),
                ..StripeConfig::new(ApiKey::new(GATEWAY_API_KEY))
            }
            .to_args(),
            None => MockConfig {
                ledger: ledger.map(Path::to_owned),
                ..self.gateway.clone()
            }
            .to_args(),
        };
        args.extend(self.service_args.iter().cloned());
        if !self.identity_keys.is_empty() {
            args.push(format!("--identity-keys={}", self.identity_keys.join(",")));
        }
        let version = match &self.deployment_version {
            Some(version) => version.clone(),
            None => build_version(&bin)?,
        };
        Ok(Deployment::new(
            "payment-service",
            bin,
            args,
            self.service_env.clone(),
            port,
            Some(&version),
            dir,
        ))
    }
}

/// One Restate node of a stack.
pub struct Node {
    name: String,
    ports: NodePorts,
    proc: Restartable,
}

/// A deployment process (payment-service or an extra one) on a fixed port.
struct Deployment {
    proc: Restartable,
    /// As registered: `http://127.0.0.1:<port>[/<version>]`.
    url: String,
    port: u16,
    /// Registered when the stack starts.
    register: bool,
}

impl Deployment {
    fn new(
        name: &str,
        bin: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        port: u16,
        version: Option<&str>,
        dir: &Path,
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let version_arg = version.map(|v| format!("--deployment-version={v}"));
        let proc = Restartable::new(name, log, move || {
            let mut cmd = Command::new(&bin);
            // The service's own variables must not leak in from the caller's environment:
            // the flags say everything.
            for var in [
                "BIND_ADDR",
                "DEPLOYMENT_VERSION",
                "IDENTITY_KEYS",
                "GATEWAY_DELAY_MS",
                "GATEWAY_DECLINE_RATE",
                "GATEWAY_ERROR_RATE",
                "GATEWAY_RESPONSE_DELAY_MS",
                "GATEWAY_LEDGER",
                "GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS",
                "GATEWAY_DROP_RESPONSE_RATE",
                "GATEWAY_HANG_RATE",
                // Which gateway, and where: the stack decides.
                "GATEWAY",
                "STRIPE_API_KEY",
                "STRIPE_API_BASE",
                "STRIPE_PAYMENT_METHOD",
                "STRIPE_ALLOWED_PAYMENT_METHOD_TYPES",
            ] {
                cmd.env_remove(var);
            }
            cmd.arg(format!("--bind=127.0.0.1:{port}"))
                .args(&version_arg)
                .args(&args)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .envs(env.iter().map(|(k, v)| (k, v)));
            cmd
        });
        let path = version.map(|v| format!("/{v}")).unwrap_or_default();
        Self {
            proc,
            url: format!("http://127.0.0.1:{port}{path}"),
            port,
            register: true,
        }
    }

    fn registered(mut self, register: bool) -> Self {
        self.register = register;
        self
    }

    /// Starts it and waits until it accepts connections; how long that took.
    fn start(&self) -> anyhow::Result<Duration> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        start_until_ready(&self.proc, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    }
}

/// Starts `proc` and waits until `ready` (polled), or it exits, or the timeout passes: then it
/// is killed and the error carries its log's tail. How long it took.
fn start_until_ready(
    proc: &Restartable,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<Duration> {
    let began = Instant::now();
    proc.start()?;
    let result = wait_until(SERVICE_READY_TIMEOUT, proc.name(), || {
        if let Some(status) = proc.died() {
            bail!("{} exited ({status})", proc.name());
        }
        Ok(ready())
    });
    if let Err(e) = result {
        proc.kill();
        return Err(e.context(format!(
            "--- {} ---\n{}",
            proc.log().display(),
            proc.tail(40)
        )));
    }
    Ok(began.elapsed())
}

/// The gateway as a process of the stack (`mock-gateway`), on a fixed port.
struct GatewayProc {
    proc: Restartable,
    port: u16,
    /// `http://127.0.0.1:<port>`: the service's `--stripe-api-base`.
    url: String,
    /// Its SQLite database; `None`: in memory.
    db: Option<PathBuf>,
}

impl GatewayProc {
    /// Starts it and waits until it answers its health check; how long that took.
    fn start(&self) -> anyhow::Result<Duration> {
        let health = format!("{}/healthz", self.url);
        let http = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()?;
        start_until_ready(&self.proc, || {
            http.get(&health)
                .send()
                .is_ok_and(|r| r.status().is_success())
        })
    }

    /// Deletes its database (a failed start of a stack in a folder of its own starts again
    /// empty), with SQLite's side files.
    fn remove_db(&self) {
        if let Some(db) = &self.db {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut name = db.clone().into_os_string();
                name.push(suffix);
                let _ = std::fs::remove_file(PathBuf::from(name));
            }
        }
    }
}

/// How long a node restart took.
#[derive(Debug, Clone, Copy)]
pub struct NodeStart {
    /// Until its admin API and ingress answered `/health`.
    pub healthy: Duration,
    /// Until invocations went through its ingress (includes `healthy`).
    pub serving: Duration,
}

/// A running stack (see the module doc).
pub struct Stack {
    /// Logs (`node-N.log`, `payment-service.log`, ...), the gateway ledger, the nodes' data.
    pub dir: PathBuf,
    cluster_name: String,
    nodes: Vec<Node>,
    ready: Arc<Vec<AtomicBool>>,
    service: Deployment,
    gateway: Option<GatewayProc>,
    extras: Vec<Deployment>,
    ledger: Option<PathBuf>,
    client: PaymentClient,
    probe: BlockingClient,
}

impl Stack {
    /// One node, the service with the default mock gateway, a temporary folder.
    pub fn builder() -> StackBuilder {
        StackBuilder {
            nodes: 1,
            config: None,
            server_env: Vec::new(),
            service_bin: None,
            gateway: MockConfig::default(),
            service_env: Vec::new(),
            service_args: Vec::new(),
            identity_keys: Vec::new(),
            deployment_version: None,
            extras: Vec::new(),
            dir: None,
            fixed_ports: None,
            cluster_name: None,
            with_ledger: true,
            gateway_process: false,
            gateway_port: None,
            gateway_env: Vec::new(),
            webhook_secret: None,
        }
    }

    /// All nodes at once (node 1 provisions; a cluster's metadata store needs a quorum, so no
    /// node is ready alone), the deployments, one registration, every node serving.
    fn bring_up(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            node.proc.start()?;
        }
        if let Some(gateway) = &self.gateway {
            gateway.start()?;
        }
        self.service.start()?;
        for extra in &self.extras {
            extra.start()?;
        }
        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        for i in 0..self.nodes.len() {
            self.wait_healthy(i, deadline)?;
        }
        for deployment in std::iter::once(&self.service).chain(&self.extras) {
            if deployment.register {
                self.register(&deployment.url)?;
            }
        }
        for i in 0..self.nodes.len() {
            self.wait_serving(i, deadline)?;
            self.ready[i].store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    // ---- addresses --------------------------------------------------------------------------

    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// `node-1`, `node-2`, ...
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    pub fn node_ports(&self, i: usize) -> NodePorts {
        self.nodes[i].ports
    }

    pub fn ingress_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].ports.ingress)
    }

    pub fn ingress_urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.ingress_url(i)).collect()
    }

    pub fn admin_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].ports.admin)
    }

    /// Node `i`'s admin API.
    pub fn admin(&self, i: usize) -> Admin {
        Admin::new(self.admin_url(i))
    }

    /// The admin API of a live node (ready, and answering `/health` now), lowest first; node 1's
    /// when none is.
    pub fn live_admin(&self) -> Admin {
        (0..self.nodes.len())
            .filter(|&i| self.is_ready(i))
            .map(|i| self.admin(i))
            .find(Admin::healthy)
            .unwrap_or_else(|| self.admin(0))
    }

    /// The service's URL as registered (`http://127.0.0.1:<port>/<deployment version>`).
    pub fn service_url(&self) -> &str {
        &self.service.url
    }

    /// The URL of extra deployment `k` (in the order they were added).
    pub fn extra_url(&self, k: usize) -> &str {
        &self.extras[k].url
    }

    /// The gateway's ledger: the in-process mock's, or with [`StackBuilder::gateway_process`]
    /// `mock-gateway`'s own (`None`: [`StackBuilder::without_ledger`]).
    pub fn ledger(&self) -> Option<&Path> {
        self.ledger.as_deref()
    }

    /// A client of every ingress, routing retries by the readiness flags; one attempt per call
    /// until told otherwise ([`PaymentClient::retry_until`]).
    pub fn client(&self) -> PaymentClient {
        self.client.clone()
    }

    /// One flag per node: ready (see the module doc).
    pub fn ready_flags(&self) -> Arc<Vec<AtomicBool>> {
        self.ready.clone()
    }

    pub fn is_ready(&self, i: usize) -> bool {
        self.ready[i].load(Ordering::SeqCst)
    }

    // ---- processes --------------------------------------------------------------------------

    pub fn node_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].proc.pid()
    }

    pub fn service_pid(&self) -> Option<u32> {
        self.service.proc.pid()
    }

    pub fn extra_pid(&self, k: usize) -> Option<u32> {
        self.extras[k].proc.pid()
    }

    /// Whether the gateway runs as a process of the stack ([`StackBuilder::gateway_process`]).
    pub fn has_gateway_process(&self) -> bool {
        self.gateway.is_some()
    }

    /// `mock-gateway`'s URL (`None`: the gateway is the service's in-process mock).
    pub fn gateway_url(&self) -> Option<&str> {
        self.gateway.as_ref().map(|g| g.url.as_str())
    }

    pub fn gateway_port(&self) -> Option<u16> {
        self.gateway.as_ref().map(|g| g.port)
    }

    pub fn gateway_pid(&self) -> Option<u32> {
        self.gateway.as_ref().and_then(|g| g.proc.pid())
    }

    /// SIGKILLs `mock-gateway` (a crash); `false` if it was not running. An error without a
    /// gateway process.
    pub fn kill_gateway(&self) -> anyhow::Result<bool> {
        Ok(self.gateway_proc()?.proc.kill())
    }

    /// Starts `mock-gateway` again (it must be down) on its port, database and ledger;
    /// returns once it answers its health check, with how long that took.
    pub fn start_gateway(&self) -> anyhow::Result<Duration> {
        self.gateway_proc()?.start()
    }

    fn gateway_proc(&self) -> anyhow::Result<&GatewayProc> {
        self.gateway.as_ref().ok_or_else(|| {
            anyhow::anyhow!("this stack has no gateway process (StackBuilder::gateway_process)")
        })
    }

    /// Every process of the stack that runs by itself (not the nodes).
    fn own_procs(&self) -> impl Iterator<Item = &Restartable> {
        std::iter::once(&self.service.proc)
            .chain(self.gateway.iter().map(|g| &g.proc))
            .chain(self.extras.iter().map(|e| &e.proc))
    }

    /// SIGKILLs node `i`. `Ok(false)` if it was not running; on a cluster an error, and no
    /// kill, while another node is not ready (two nodes down stop a replication-2 cluster).
    pub fn kill_node(&self, i: usize) -> anyhow::Result<bool> {
        if let Some(other) = (0..self.nodes.len()).find(|&j| j != i && !self.is_ready(j)) {
            bail!(
                "not killing {}: {} is not ready (never two nodes down at once)",
                self.nodes[i].name,
                self.nodes[other].name
            );
        }
        self.ready[i].store(false, Ordering::SeqCst);
        Ok(self.nodes[i].proc.kill())
    }

    /// Like [`Self::kill_node`], without the check: the caller takes the quorum down on purpose.
    pub fn kill_node_unchecked(&self, i: usize) -> bool {
        self.ready[i].store(false, Ordering::SeqCst);
        self.nodes[i].proc.kill()
    }

    /// Stops node `i` gracefully (SIGTERM, SIGKILL after a grace period); `false` if it was
    /// not running.
    pub fn stop_node(&self, i: usize) -> bool {
        self.ready[i].store(false, Ordering::SeqCst);
        self.nodes[i].proc.stop(GRACE)
    }

    /// Stops the service gracefully; `false` if it was not running.
    pub fn stop_service(&self) -> bool {
        self.service.proc.stop(GRACE)
    }

    /// Starts node `i` again (it must be down) on its ports and data; returns once it serves.
    pub fn start_node(&self, i: usize) -> anyhow::Result<NodeStart> {
        let began = Instant::now();
        self.nodes[i].proc.start()?;
        let deadline = began + NODE_READY_TIMEOUT;
        let result = self.wait_healthy(i, deadline).and_then(|()| {
            let healthy = began.elapsed();
            self.wait_serving(i, deadline)?;
            Ok(NodeStart {
                healthy,
                serving: began.elapsed(),
            })
        });
        match result {
            Ok(started) => {
                self.ready[i].store(true, Ordering::SeqCst);
                Ok(started)
            }
            Err(e) => {
                self.nodes[i].proc.kill();
                Err(e)
            }
        }
    }

    /// Waits until node `i` (running) serves again, e.g. after it was found not to.
    pub fn wait_node_ready(&self, i: usize) -> anyhow::Result<Duration> {
        let began = Instant::now();
        let deadline = began + NODE_READY_TIMEOUT;
        self.wait_healthy(i, deadline)?;
        self.wait_serving(i, deadline)?;
        self.ready[i].store(true, Ordering::SeqCst);
        Ok(began.elapsed())
    }

    /// SIGKILLs the service (a crash); `false` if it was not running.
    pub fn kill_service(&self) -> bool {
        self.service.proc.kill()
    }

    /// Starts the service on its port and ledger (it must be down); returns once it accepts
    /// connections, with how long that took. Not registered again: it is the same build at the
    /// same URL, the deployment Restate already knows (and would answer 200, unchanged).
    pub fn start_service(&self) -> anyhow::Result<Duration> {
        self.service.start()
    }

    /// `Some(message)` if a process that should run has exited by itself.
    pub fn died(&self) -> Option<String> {
        self.nodes
            .iter()
            .map(|n| &n.proc)
            .chain(self.own_procs())
            .find_map(|p| {
                p.died()
                    .map(|status| format!("{} exited by itself: {status}", p.name()))
            })
    }

    /// Starts whatever is down (killed, or exited by itself): the nodes one at a time, each
    /// until it serves, then the gateway process, then the service.
    pub fn ensure_up(&self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.nodes[i].proc.clear_if_dead();
            if self.nodes[i].proc.pid().is_none() {
                self.ready[i].store(false, Ordering::SeqCst);
                self.start_node(i)?;
            } else if !self.is_ready(i) {
                self.wait_node_ready(i)?;
            }
        }
        if let Some(gateway) = &self.gateway {
            gateway.proc.clear_if_dead();
            if gateway.proc.pid().is_none() {
                gateway.start()?;
            }
        }
        self.service.proc.clear_if_dead();
        if self.service.proc.pid().is_none() {
            self.start_service()?;
        }
        Ok(())
    }

    /// Stops the deployments, then the nodes together (SIGTERM, SIGKILL after a grace period):
    /// one at a time, the last ones would wait for a quorum that is gone.
    pub fn stop(&self) {
        self.service.proc.stop(GRACE);
        if let Some(gateway) = &self.gateway {
            gateway.proc.stop(GRACE);
        }
        for extra in &self.extras {
            extra.proc.stop(GRACE);
        }
        for r in self.ready.iter() {
            r.store(false, Ordering::SeqCst);
        }
        let nodes: Vec<_> = self.nodes.iter().filter_map(|n| n.proc.take()).collect();
        process::stop_all(nodes, GRACE);
    }

    /// Log tails of every process, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| &n.proc)
            .chain(self.own_procs())
            .map(|p| format!("--- {} ---\n{}\n", p.log().display(), p.tail(30)))
            .collect()
    }

    // ---- readiness --------------------------------------------------------------------------

    fn wait_healthy(&self, i: usize, deadline: Instant) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let admin = self.admin(i);
        let ingress_health = format!("{}/restate/health", self.ingress_url(i));
        let http = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()?;
        loop {
            self.check_running(i)?;
            if admin.healthy()
                && http
                    .get(&ingress_health)
                    .send()
                    .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} is not healthy after {NODE_READY_TIMEOUT:?}:\n{}",
                    node.name,
                    node.proc.tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Until [`READY_PROBES`] invocations went through node `i`'s ingress.
    fn wait_serving(&self, i: usize, deadline: Instant) -> anyhow::Result<()> {
        static PROBES: AtomicUsize = AtomicUsize::new(0);
        let node = &self.nodes[i];
        for _ in 0..READY_PROBES {
            let n = PROBES.fetch_add(1, Ordering::Relaxed);
            let id = format!("{PROBE_PREFIX}{}-{n}", node.name);
            loop {
                self.check_running(i)?;
                let answer = self.probe.block_on(self.probe.inner().call_raw(
                    i,
                    &id,
                    GET,
                    Some("{}".into()),
                    &[],
                ));
                let last = match answer {
                    Ok((404, body)) if is_not_found(&body, &id) => break,
                    Ok((status, body)) => format!("HTTP {status}: {body}"),
                    Err(e) => e.to_string(),
                };
                if Instant::now() >= deadline {
                    bail!(
                        "{} does not run invocations after {NODE_READY_TIMEOUT:?} (last answer to \
                         GetPayment {id}: {last}):\n{}",
                        node.name,
                        node.proc.tail(40)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Registers `uri` (without `force`: see [`Admin::register`]) through a node's admin API
    /// (node 1 first), until accepted: a new cluster may answer 5xx for a while. The
    /// deployment's ID.
    pub fn register(&self, uri: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + REGISTER_TIMEOUT;
        let mut last = String::new();
        for attempt in 0usize.. {
            if let Some(died) = self.died() {
                bail!("{died}\n{}", self.logs());
            }
            match self.admin(attempt % self.nodes.len()).register(uri) {
                Ok(id) => return Ok(id),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!("registering {uri} failed for {REGISTER_TIMEOUT:?}; last: {last}")
    }

    fn check_running(&self, i: usize) -> anyhow::Result<()> {
        let proc = &self.nodes[i].proc;
        if proc.pid().is_none() {
            bail!("{} is not running", proc.name());
        }
        if let Some(status) = proc.died() {
            bail!("{} exited ({status}):\n{}", proc.name(), proc.tail(40));
        }
        Ok(())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A build's deployment version: `build-<mtime>-<size>` of the binary. Cargo writes the binary
/// anew when it links a changed build, and leaves it alone otherwise, so the same build keeps
/// its version (and its deployment) across runs on a kept data folder, and a new build is
/// registered as a new deployment. (Hashing the contents would read ~100 MB of debug binary
/// at every start.)
pub fn build_version(bin: &Path) -> anyhow::Result<String> {
    let meta =
        std::fs::metadata(bin).map_err(|e| anyhow::anyhow!("reading {}: {e}", bin.display()))?;
    let modified = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(format!(
        "build-{}.{:09}-{}",
        modified.as_secs(),
        modified.subsec_nanos(),
        meta.len()
    ))
}

/// Polls `ready` every 25 ms until it says `true`, fails, or `timeout` passes.
pub fn wait_until(
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
        std::thread::sleep(Duration::from_millis(25));
    }
}
