//! A three-node Restate cluster owned by one test, that the test may crash: three
//! restate-server nodes (one cluster, replication 2, fresh data in a temp dir, ports chosen at
//! start) and payment-service, registered once. Each node can be SIGKILLed and started again
//! on the same ports and data dir; so can the service, on the same port and gateway ledger.
//!
//! ```ignore
//! let cluster = OwnedCluster::start(&[("GATEWAY_RESPONSE_DELAY_MS", "100".into())])?;
//! cluster.kill_node(1);
//! cluster.start_node(1)?;   // same ports and data; returns once it runs invocations again
//! cluster.kill_service();
//! cluster.start_service()?;
//! let rows = cluster.app().try_query("SELECT count(*) AS n FROM sys_invocation");
//! ```
//!
//! The nodes are started as `scripts/cluster-lib.sh` starts them: the native `restate-server`
//! (never the npm `.bin` wrapper, see [`super::checked_server_binary`]) with
//! `--config-file restate/cluster/cluster.toml --listen-mode tcp`, and per node
//! `RESTATE_NODE_NAME`, `RESTATE_BIND_ADDRESS`, `RESTATE_ADVERTISED_ADDRESS`,
//! `RESTATE_INGRESS__BIND_ADDRESS`, `RESTATE_ADMIN__BIND_ADDRESS`,
//! `RESTATE_METADATA_CLIENT__ADDRESSES` (all three nodes) and `RESTATE_AUTO_PROVISION=true` on
//! node 1 only. The cluster gets a name of its own, so that it can never join another.
//!
//! Ports are picked below Linux's ephemeral range (as `scripts/bench.sh` does): a node
//! restarted in the middle of a test must never find its port taken as the local port of some
//! outgoing connection.
//!
//! A node is *ready* when its admin API and ingress answer `/health` and an invocation goes
//! through its ingress end to end (`GetPayment` of a `probe-…` ID answers the handler's own
//! 404): a restarted node answers health before it can run invocations. The readiness flags
//! ([`OwnedCluster::ready_flags`]) are what a client-side load balancer would know.
//!
//! Nothing here stops a test from taking two nodes down at once; [`OwnedCluster::kill_node`]
//! refuses to, though, while another node is not ready again.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use super::{
    REQUEST_TIMEOUT, SERVICE, ServiceProcess, TestApp, checked_server_binary, healthy, http_client,
    lock, process,
};

/// Nodes in the cluster.
pub const NODES: usize = 3;
/// Replication of logs and partitions (as `restate/cluster/cluster.toml`).
pub const REPLICATION: usize = 2;
/// Prefix of the readiness probes' payment IDs: never a payment.
pub const PROBE_PREFIX: &str = "probe-";

/// How long a node may take to be ready, at start and after a restart (a busy 2-core machine
/// running three nodes can be slow).
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the first registration may take (the cluster is still provisioning its partitions).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(120);
/// Invocations a readiness check sends through the node's ingress (different keys, so
/// different partitions).
const READY_PROBES: usize = 3;
/// One probe request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at bringing the fresh cluster up (fresh ports and data each time).
const START_ATTEMPTS: u32 = 2;

/// The ports of one node, kept across its restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePorts {
    pub ingress: u16,
    pub admin: u16,
    /// Node-to-node (and metadata, restatectl) address.
    pub node: u16,
}

struct Node {
    /// `node-1`, `node-2`, `node-3`.
    name: String,
    ports: NodePorts,
    base_dir: PathBuf,
    log: PathBuf,
    pid: Mutex<Option<u32>>,
}

impl Node {
    fn ingress_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.ingress)
    }

    fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.admin)
    }

    fn node_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.node)
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

/// Three restate-server nodes and payment-service, each killable and restartable in place.
pub struct OwnedCluster {
    /// Temp dir: node logs (`node-N.log`), `payment-service.log`, the gateway ledger, and the
    /// nodes' data (`restate-data/node-N/`).
    pub dir: PathBuf,
    /// The service's URL as registered.
    pub service_url: String,
    cluster_name: String,
    server_bin: PathBuf,
    nodes: Vec<Node>,
    ready: Arc<Vec<AtomicBool>>,
    service: ServiceProcess,
    probe: Client,
    client: Client,
}

impl OwnedCluster {
    /// Starts the three nodes and the service (with `service_env` added to its environment),
    /// registers the service once, and waits until every node is ready.
    pub fn start(service_env: &[(&str, String)]) -> anyhow::Result<Self> {
        let service_env: Vec<(String, String)> = service_env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        process::install_exit_hook();
        let dir = process::temp_dir().context("creating the temp dir")?;
        let server_bin = checked_server_binary()?;
        let mut last_error = None;
        for attempt in 1..=START_ATTEMPTS {
            let mut taken = HashSet::new();
            let mut ports = Vec::with_capacity(NODES);
            for _ in 0..NODES {
                ports.push(NodePorts {
                    ingress: low_free_port(&mut taken)?,
                    admin: low_free_port(&mut taken)?,
                    node: low_free_port(&mut taken)?,
                });
            }
            let service_port = low_free_port(&mut taken)?;
            let data = dir.join("restate-data");
            let cluster = Self {
                service_url: format!("http://127.0.0.1:{service_port}"),
                cluster_name: format!(
                    "payment-test-{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..12]
                ),
                server_bin: server_bin.clone(),
                nodes: ports
                    .iter()
                    .enumerate()
                    .map(|(i, &ports)| {
                        let name = format!("node-{}", i + 1);
                        Node {
                            base_dir: data.join(&name),
                            log: dir.join(format!("{name}.log")),
                            name,
                            ports,
                            pid: Mutex::new(None),
                        }
                    })
                    .collect(),
                ready: Arc::new((0..NODES).map(|_| AtomicBool::new(false)).collect()),
                service: ServiceProcess::new(
                    ([127, 0, 0, 1], service_port).into(),
                    service_env.clone(),
                    dir.join("gateway-ledger.jsonl"),
                    dir.join(SERVICE_LOG),
                ),
                probe: http_client(Duration::from_secs(2))?,
                client: http_client(REQUEST_TIMEOUT)?,
                dir: dir.clone(),
            };
            match cluster.bring_up() {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    eprintln!("cluster start attempt {attempt} failed: {e:#}");
                    cluster.stop();
                    let _ = std::fs::remove_dir_all(&data);
                    let _ = std::fs::remove_file(&cluster.service.ledger);
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("no attempt made")))
    }

    /// All three nodes at once (node 1 provisions; the metadata store needs two of three for a
    /// quorum, so no node is ready alone), the service, one registration, every node ready.
    fn bring_up(&self) -> anyhow::Result<()> {
        for i in 0..NODES {
            let pid = self.spawn_node(i)?;
            *lock(&self.nodes[i].pid) = Some(pid);
        }
        self.start_service()?;
        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        for i in 0..NODES {
            self.wait_healthy(i, deadline)?;
        }
        self.register()?;
        for i in 0..NODES {
            self.wait_serving(i, deadline)?;
            self.ready[i].store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    // ---- addresses ---------------------------------------------------------------------------

    /// The cluster's name (`RESTATE_CLUSTER_NAME`).
    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    /// The node names, `node-1` to `node-3`.
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    pub fn ports(&self, i: usize) -> NodePorts {
        self.nodes[i].ports
    }

    /// The ingress URL of each node, in node order.
    pub fn ingress_urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::ingress_url).collect()
    }

    /// The admin API URL of each node, in node order.
    pub fn admin_urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::admin_url).collect()
    }

    /// The admin API of a live node (ready, and answering `/health` now): where to run SQL.
    pub fn live_admin(&self) -> Option<String> {
        self.live_node().map(|i| self.nodes[i].admin_url())
    }

    /// A live node (ready, and its admin API answers `/health` now), lowest index first.
    pub fn live_node(&self) -> Option<usize> {
        (0..NODES).find(|&i| {
            self.is_ready(i)
                && self
                    .probe
                    .get(format!("{}/health", self.nodes[i].admin_url()))
                    .send()
                    .is_ok_and(|r| r.status().is_success())
        })
    }

    /// Helpers (ingress calls, admin SQL) through node `i`.
    pub fn app_of(&self, i: usize) -> TestApp {
        TestApp {
            ingress: self.nodes[i].ingress_url(),
            admin: self.nodes[i].admin_url(),
            service_url: self.service_url.clone(),
            ledger: Some(self.service.ledger.clone()),
            dir: Some(self.dir.clone()),
            client: self.client.clone(),
        }
    }

    /// Helpers through a live node (node 1 if none is).
    pub fn app(&self) -> TestApp {
        self.app_of(self.live_node().unwrap_or(0))
    }

    /// The gateway ledger of the service.
    pub fn ledger(&self) -> &Path {
        &self.service.ledger
    }

    // ---- nodes -------------------------------------------------------------------------------

    pub fn node_pid(&self, i: usize) -> Option<u32> {
        *lock(&self.nodes[i].pid)
    }

    /// Node `i` is running and was ready since it last started.
    pub fn is_ready(&self, i: usize) -> bool {
        self.ready[i].load(Ordering::SeqCst)
    }

    /// One flag per node: ready (see the module doc). Shared, e.g. with a load that routes
    /// around a node that is down, as a load balancer's health checks would.
    pub fn ready_flags(&self) -> Arc<Vec<AtomicBool>> {
        self.ready.clone()
    }

    /// SIGKILLs node `i` (a crash: no graceful shutdown). `Ok(false)` if it was not running;
    /// an error, and no kill, if another node is not ready (two nodes down would stop a
    /// three-node cluster with replication 2).
    pub fn kill_node(&self, i: usize) -> anyhow::Result<bool> {
        if let Some(other) = (0..NODES).find(|&j| j != i && !self.is_ready(j)) {
            bail!(
                "not killing {}: {} is not ready (never two nodes down at once)",
                self.nodes[i].name,
                self.nodes[other].name
            );
        }
        self.ready[i].store(false, Ordering::SeqCst);
        Ok(lock(&self.nodes[i].pid)
            .take()
            .and_then(process::kill)
            .is_some())
    }

    /// Starts node `i` again (it must be down) on its ports and data dir; returns once it is
    /// ready (health, then invocations through its ingress), with how long each took.
    pub fn start_node(&self, i: usize) -> anyhow::Result<NodeStart> {
        let began = Instant::now();
        {
            let mut slot = lock(&self.nodes[i].pid);
            anyhow::ensure!(slot.is_none(), "{} is already running", self.nodes[i].name);
            *slot = Some(self.spawn_node(i)?);
        }
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
                if let Some(pid) = lock(&self.nodes[i].pid).take() {
                    process::kill(pid);
                }
                Err(e)
            }
        }
    }

    /// Waits until node `i` (running) is ready again, e.g. after it was found not serving.
    pub fn wait_node_ready(&self, i: usize) -> anyhow::Result<Duration> {
        let began = Instant::now();
        let deadline = began + NODE_READY_TIMEOUT;
        self.wait_healthy(i, deadline)?;
        self.wait_serving(i, deadline)?;
        self.ready[i].store(true, Ordering::SeqCst);
        Ok(began.elapsed())
    }

    fn spawn_node(&self, i: usize) -> anyhow::Result<u32> {
        let node = &self.nodes[i];
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("restate/cluster/cluster.toml");
        anyhow::ensure!(
            config.is_file(),
            "the cluster's config {} is missing",
            config.display()
        );
        let metadata = json!(self.nodes.iter().map(Node::node_url).collect::<Vec<_>>());
        let mut cmd = Command::new(&self.server_bin);
        cmd.arg("--base-dir")
            .arg(&node.base_dir)
            .arg("--config-file")
            .arg(&config)
            .arg("--no-logo")
            // TCP only: unix sockets under a long temp path exceed the socket path limit.
            .args(["--listen-mode", "tcp"])
            // RUST_LOG is meant for payment-service.
            .env_remove("RUST_LOG")
            .env("RESTATE_LOG_DISABLE_ANSI_CODES", "true")
            .env("RESTATE_CLUSTER_NAME", &self.cluster_name)
            .env("RESTATE_NODE_NAME", &node.name)
            // Only node 1 provisions the cluster (once: on a restart it finds it provisioned).
            .env("RESTATE_AUTO_PROVISION", (i == 0).to_string())
            .env("RESTATE_DEFAULT_REPLICATION", REPLICATION.to_string())
            .env(
                "RESTATE_BIND_ADDRESS",
                format!("127.0.0.1:{}", node.ports.node),
            )
            .env("RESTATE_ADVERTISED_ADDRESS", node.node_url())
            .env(
                "RESTATE_INGRESS__BIND_ADDRESS",
                format!("127.0.0.1:{}", node.ports.ingress),
            )
            .env(
                "RESTATE_ADMIN__BIND_ADDRESS",
                format!("127.0.0.1:{}", node.ports.admin),
            )
            .env("RESTATE_METADATA_CLIENT__ADDRESSES", metadata.to_string());
        process::spawn_logged(cmd, &node.log)
            .with_context(|| format!("spawning {} ({})", node.name, self.server_bin.display()))
    }

    /// Fails if node `i` is down or has exited (with its log's tail).
    fn check_node_alive(&self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let Some(pid) = *lock(&node.pid) else {
            bail!("{} is not running", node.name);
        };
        if let Some(status) = process::exited(pid) {
            bail!(
                "{} (pid {pid}) exited ({status}):\n{}",
                node.name,
                process::tail(&node.log, 40)
            );
        }
        Ok(())
    }

    fn wait_healthy(&self, i: usize, deadline: Instant) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let (admin, ingress) = (node.admin_url(), node.ingress_url());
        loop {
            self.check_node_alive(i)?;
            if healthy(&self.probe, &admin, &ingress) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} is not healthy after {NODE_READY_TIMEOUT:?}:\n{}",
                    node.name,
                    process::tail(&node.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Until [`READY_PROBES`] invocations went through node `i`'s ingress: `GetPayment` of a
    /// probe ID answers the handler's 404. Before that, a node may refuse connections, answer
    /// 5xx, or 404 `service not found` (registrations not loaded yet).
    fn wait_serving(&self, i: usize, deadline: Instant) -> anyhow::Result<()> {
        static PROBES: AtomicUsize = AtomicUsize::new(0);
        let node = &self.nodes[i];
        for _ in 0..READY_PROBES {
            let id = format!(
                "{PROBE_PREFIX}{}-{}",
                node.name,
                PROBES.fetch_add(1, Ordering::Relaxed)
            );
            let url = format!("{}/{SERVICE}/{id}/GetPayment", node.ingress_url());
            let expected = format!("payment {id} not found");
            let mut last: String;
            loop {
                self.check_node_alive(i)?;
                let answer = self
                    .client
                    .post(&url)
                    .timeout(PROBE_TIMEOUT)
                    .header("content-type", "application/json")
                    .body("{}")
                    .send()
                    .and_then(|r| Ok((r.status().as_u16(), r.text()?)));
                match answer {
                    Ok((404, body))
                        if serde_json::from_str::<Value>(&body)
                            .is_ok_and(|v| v["message"] == expected.as_str()) =>
                    {
                        break;
                    }
                    Ok((status, body)) => last = format!("HTTP {status}: {body}"),
                    Err(e) => last = e.to_string(),
                }
                if Instant::now() >= deadline {
                    bail!(
                        "{} does not run invocations after {NODE_READY_TIMEOUT:?} (last answer to \
                         GetPayment {id}: {last}):\n{}",
                        node.name,
                        process::tail(&node.log, 40)
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// `POST /deployments {uri, force: true}` through a live node's admin API (node 1 first),
    /// until it is accepted: a freshly provisioned cluster may answer 5xx for a while.
    fn register(&self) -> anyhow::Result<()> {
        let body = json!({ "uri": self.service_url, "force": true });
        let deadline = Instant::now() + REGISTER_TIMEOUT;
        let mut last = String::new();
        for attempt in 0usize.. {
            self.check_service_alive()?;
            let node = &self.nodes[attempt % NODES];
            let url = format!("{}/deployments", node.admin_url());
            match self
                .probe
                .post(&url)
                .timeout(Duration::from_secs(30))
                .json(&body)
                .send()
            {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => {
                    let status = resp.status();
                    last = format!("{url}: HTTP {status}: {}", resp.text().unwrap_or_default());
                }
                Err(e) => last = format!("{url}: {e}"),
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!(
            "registering {} failed for {REGISTER_TIMEOUT:?}; last: {last}\n{}",
            self.service_url,
            self.logs()
        )
    }

    // ---- the service -------------------------------------------------------------------------

    pub fn service_pid(&self) -> Option<u32> {
        self.service.pid()
    }

    /// SIGKILLs the service; `false` if it was not running.
    pub fn kill_service(&self) -> bool {
        self.service.kill()
    }

    /// Starts the service on its port and ledger (it must be down); returns once it accepts
    /// connections, with how long that took.
    pub fn start_service(&self) -> anyhow::Result<Duration> {
        self.service.start()
    }

    fn check_service_alive(&self) -> anyhow::Result<()> {
        if let Some(pid) = self.service_pid()
            && let Some(status) = process::exited(pid)
        {
            bail!(
                "payment-service exited ({status}):\n{}",
                process::tail(&self.service.log, 40)
            );
        }
        Ok(())
    }

    // ---- the whole cluster -------------------------------------------------------------------

    /// `Some(message)` if a process that should run has exited by itself.
    pub fn died(&self) -> Option<String> {
        let slots = self
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), &n.pid))
            .chain([("payment-service", &self.service.pid)]);
        for (name, slot) in slots {
            if let Some(pid) = *lock(slot)
                && let Some(status) = process::exited(pid)
            {
                return Some(format!("{name} (pid {pid}) exited by itself: {status}"));
            }
        }
        None
    }

    /// Starts whatever is down (killed, or exited by itself): the nodes one at a time, each
    /// until ready, then the service.
    pub fn ensure_up(&self) -> anyhow::Result<()> {
        for slot in self.nodes.iter().map(|n| &n.pid).chain([&self.service.pid]) {
            let mut slot = lock(slot);
            if let Some(pid) = *slot
                && process::exited(pid).is_some()
            {
                process::kill(pid); // reaps it
                *slot = None;
            }
        }
        for i in 0..NODES {
            if self.node_pid(i).is_none() {
                self.ready[i].store(false, Ordering::SeqCst);
                self.start_node(i)?;
            } else if !self.is_ready(i) {
                self.wait_node_ready(i)?;
            }
        }
        if self.service_pid().is_none() {
            self.start_service()?;
        }
        Ok(())
    }

    /// Stops the service, then the three nodes together (SIGTERM, SIGKILL after a grace
    /// period): one at a time, the last ones would wait for a quorum that is gone.
    pub fn stop(&self) {
        if let Some(pid) = lock(&self.service.pid).take() {
            process::stop(pid);
        }
        let pids: Vec<u32> = self
            .nodes
            .iter()
            .filter_map(|n| lock(&n.pid).take())
            .collect();
        for r in self.ready.iter() {
            r.store(false, Ordering::SeqCst);
        }
        process::stop_all(&pids);
    }

    /// Log tails of every node and the service, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!(
                "--- {}.log ---\n{}\n",
                node.name,
                process::tail(&node.log, 30)
            ));
        }
        out.push_str(&format!(
            "--- {SERVICE_LOG} ---\n{}\n",
            process::tail(&self.service.log, 30)
        ));
        out
    }
}

const SERVICE_LOG: &str = "payment-service.log";

/// A port on 127.0.0.1 that is free now, below the ephemeral port range (where outgoing
/// connections take their local ports) and outside 20000-23999 (the fixed ports of
/// `scripts/run-cluster.sh`); never one already in `taken`.
fn low_free_port(taken: &mut HashSet<u16>) -> anyhow::Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&low| low > 12_000)
        .unwrap_or(32_768);
    for _ in 0..1000 {
        let port = rand::random_range(10_000..ephemeral_low);
        if (20_000..24_000).contains(&port) || taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return Ok(port);
        }
    }
    bail!("no free port found below {ephemeral_low}")
}
