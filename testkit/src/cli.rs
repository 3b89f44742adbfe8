//! `stackctl stack` and `stackctl cluster`: a stack in the foreground for a person to use, on
//! fixed ports, with its data kept between runs.
//!
//! `cluster up` owns its processes and listens on a control socket (`<dir>/control.sock`):
//! `stackctl cluster kill 2` from another terminal asks it to kill node 2. Only the owner ever
//! signals a process, and only one it still holds, so no pid is signalled after it is gone;
//! Ctrl-C (or SIGTERM) on the owner stops everything, nodes restarted from another terminal
//! included.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser as _;
use payment_service::config::Config;

use crate::paths;
use crate::ports;
use crate::stack::{NodePorts, Stack};

/// Options of `stackctl stack up`.
#[derive(Debug, clap::Args)]
pub struct StackArgs {
    #[command(subcommand)]
    command: StackCommand,
}

#[derive(Debug, clap::Subcommand)]
enum StackCommand {
    /// restate-server + payment-service, registered, until Ctrl-C. The service takes its
    /// settings from the environment as it would alone (GATEWAY_*, IDENTITY_KEYS, RUST_LOG).
    Up {
        /// Wipe the data folder (Restate's journal and state, logs, ledger) first.
        #[arg(long)]
        fresh: bool,
        /// Data and logs.
        #[arg(long, default_value = ".stack")]
        dir: PathBuf,
        #[arg(long, env = "INGRESS_PORT", default_value_t = 8080)]
        ingress_port: u16,
        #[arg(long, env = "ADMIN_PORT", default_value_t = 9070)]
        admin_port: u16,
        #[arg(long, env = "NODE_PORT", default_value_t = 5122)]
        node_port: u16,
        #[arg(long, env = "SERVICE_PORT", default_value_t = 9090)]
        service_port: u16,
        #[command(flatten)]
        gateway: GatewayProcessArgs,
    },
}

/// The webhook signing secret of a local stack with the gateway process: not a secret, since
/// only that stack's mock-gateway signs with it and only its service verifies with it.
const LOCAL_WEBHOOK_SECRET: &str = "whsec_local_stack";

/// The gateway as a process of the stack (`stack up`, `cluster up`).
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayProcessArgs {
    /// Run the gateway as a process of its own: `mock-gateway` (a simulated Stripe) with the
    /// GATEWAY_* settings (delay, decline, error, drop-response and hang rates), its database
    /// and ledger in the data folder, and the service with `--gateway stripe` against it.
    #[arg(long)]
    pub gateway_process: bool,
    /// With --gateway-process: mock-gateway's port.
    #[arg(long, env = "GATEWAY_PORT", default_value_t = 12111)]
    pub gateway_port: u16,
}

/// Options of `stackctl cluster`.
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Data, logs and the control socket.
    #[arg(long, env = "CLUSTER_DIR", default_value = ".cluster", global = true)]
    dir: PathBuf,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ClusterCommand {
    /// Three Restate nodes (replication 2) + payment-service, registered, until Ctrl-C.
    Up {
        /// Delete the data folder (all three nodes' data) first.
        #[arg(long)]
        fresh: bool,
        /// Ingress ports of nodes 1, 2, 3.
        #[arg(long, env = "INGRESS_PORTS", default_value = "21080 22080 23080")]
        ingress_ports: String,
        /// Admin API ports of nodes 1, 2, 3.
        #[arg(long, env = "ADMIN_PORTS", default_value = "21070 22070 23070")]
        admin_ports: String,
        /// Node-to-node ports of nodes 1, 2, 3.
        #[arg(long, env = "NODE_PORTS", default_value = "21122 22122 23122")]
        node_ports: String,
        #[arg(long, env = "SERVICE_PORT", default_value_t = 20090)]
        service_port: u16,
        #[arg(long, env = "CLUSTER_NAME", default_value = "payment-cluster")]
        name: String,
        #[command(flatten)]
        gateway: ClusterGatewayArgs,
    },
    /// Which processes run, and `restatectl status`.
    Status,
    /// SIGKILL node N (1-3).
    Kill {
        node: usize,
    },
    /// Start node N again, on its data; returns once it serves.
    Start {
        node: usize,
    },
    /// SIGTERM node N.
    Stop {
        node: usize,
    },
    /// Wait until node N serves invocations.
    WaitReady {
        node: usize,
    },
    KillService,
    StartService,
    /// SIGKILL the gateway process (with `up --gateway-process`).
    KillGateway,
    /// Start the gateway process again, on its database.
    StartGateway,
}

/// [`GatewayProcessArgs`] with the cluster's port range.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterGatewayArgs {
    /// As `stack up --gateway-process`.
    #[arg(long)]
    pub gateway_process: bool,
    /// With --gateway-process: mock-gateway's port.
    #[arg(long, env = "GATEWAY_PORT", default_value_t = 20111)]
    pub gateway_port: u16,
}

pub fn stack(args: StackArgs) -> anyhow::Result<()> {
    let StackCommand::Up {
        fresh,
        dir,
        ingress_port,
        admin_port,
        node_port,
        service_port,
        gateway,
    } = args.command;
    let nodes = vec![NodePorts {
        ingress: ingress_port,
        admin: admin_port,
        node: node_port,
    }];
    let stack = start_fixed(&dir, fresh, nodes, service_port, "payment-stack", &gateway)?;
    let ingress = stack.ingress_url(0);
    let restate = paths::repo_root().join("scripts/restate/node_modules/.bin/restate");
    println!(
        "\nStack is up. Restate ingress {ingress}, admin {}, payment-service {}. Logs in {}/.\n\n\
         Create a payment (run it twice: the second call returns the same result, no second charge):\n  \
         curl -X POST {ingress}/PaymentService/payment-001/CreatePayment \\\n    \
         -H 'Content-Type: application/json' \\\n    \
         -d '{{\"amount\": 10000, \"currency\": \"USD\", \"description\": \"Premium subscription\", \"customerId\": \"cust-alice\"}}'\n\n\
         Get its status:\n  curl -X POST {ingress}/PaymentService/payment-001/GetPayment \\\n    \
         -H 'Content-Type: application/json' -d '{{}}'\n\n\
         Refund it:\n  curl -X POST {ingress}/PaymentService/payment-001/RefundPayment \\\n    \
         -H 'Content-Type: application/json' \\\n    -d '{{\"reason\": \"Customer request\", \"amount\": 10000}}'\n\n\
         Inspect the virtual object's state with the Restate CLI:\n  \
         RESTATE_ADMIN_URL={} {} kv get PaymentService payment-001\n\n\
         Gateway: {}; its audit ledger (one line per gateway call): {}\n\
         State persists in {} across runs; use --fresh to start over.\nPress Ctrl-C to stop everything.\n",
        stack.admin_url(0),
        stack.service_url(),
        dir.display(),
        stack.admin_url(0),
        restate.display(),
        stack.gateway_url().map_or("the service's in-process mock".into(), |url| format!(
            "mock-gateway at {url} (the service with --gateway stripe; log {}/mock-gateway.log)",
            dir.display()
        )),
        stack
            .ledger()
            .map_or("none".into(), |p| p.display().to_string()),
        dir.display(),
    );
    let stack = Arc::new(stack);
    let died = wait_for_signal(&stack, true)?;
    drop(stack);
    match died {
        Some(what) => bail!("{what}; everything else stopped"),
        None => Ok(()),
    }
}

pub fn cluster(args: ClusterArgs) -> anyhow::Result<()> {
    let socket = args.dir.join("control.sock");
    let command = match args.command {
        ClusterCommand::Up {
            fresh,
            ingress_ports,
            admin_ports,
            node_ports,
            service_port,
            name,
            gateway,
        } => {
            let (i, a, n) = (
                port_list(&ingress_ports)?,
                port_list(&admin_ports)?,
                port_list(&node_ports)?,
            );
            let nodes = (0..3)
                .map(|k| NodePorts {
                    ingress: i[k],
                    admin: a[k],
                    node: n[k],
                })
                .collect();
            let gateway = GatewayProcessArgs {
                gateway_process: gateway.gateway_process,
                gateway_port: gateway.gateway_port,
            };
            return cluster_up(&args.dir, fresh, nodes, service_port, &name, &gateway);
        }
        ClusterCommand::Status => "status".to_owned(),
        ClusterCommand::Kill { node } => format!("kill {node}"),
        ClusterCommand::Start { node } => format!("start {node}"),
        ClusterCommand::Stop { node } => format!("stop {node}"),
        ClusterCommand::WaitReady { node } => format!("wait-ready {node}"),
        ClusterCommand::KillService => "kill-service".to_owned(),
        ClusterCommand::StartService => "start-service".to_owned(),
        ClusterCommand::KillGateway => "kill-gateway".to_owned(),
        ClusterCommand::StartGateway => "start-gateway".to_owned(),
    };
    let answer = ask(&socket, &command)?;
    print!("{}", answer.strip_prefix("ok\n").unwrap_or(&answer));
    if command == "status"
        && let Some(addresses) = answer.lines().find_map(|l| l.strip_prefix("restatectl "))
    {
        println!();
        let status = std::process::Command::new(paths::restatectl()?)
            .args(["--address", addresses, "status"])
            .status()?;
        anyhow::ensure!(status.success(), "restatectl status failed");
    }
    if answer.starts_with("error") {
        std::process::exit(1);
    }
    Ok(())
}

fn cluster_up(
    dir: &Path,
    fresh: bool,
    nodes: Vec<NodePorts>,
    service_port: u16,
    name: &str,
    gateway: &GatewayProcessArgs,
) -> anyhow::Result<()> {
    let socket = dir.join("control.sock");
    if socket.exists() && UnixStream::connect(&socket).is_ok() {
        bail!(
            "a cluster from another run is still up (its control socket {} answers); stop it \
             with Ctrl-C where it runs",
            socket.display()
        );
    }
    let stack = Arc::new(start_fixed(dir, fresh, nodes, service_port, name, gateway)?);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("binding the control socket {}", socket.display()))?;
    {
        let stack = Arc::clone(&stack);
        std::thread::spawn(move || serve_control(&listener, &stack));
    }
    let ingress1 = stack.ingress_url(0);
    println!(
        "\nCluster '{name}' is up: 3 Restate nodes, replication 2, and payment-service {}.",
        stack.service_url()
    );
    for i in 0..stack.node_count() {
        let p = stack.node_ports(i);
        println!(
            "  {}  ingress {}  admin {}  node http://127.0.0.1:{}",
            stack.node_name(i),
            stack.ingress_url(i),
            stack.admin_url(i),
            p.node
        );
    }
    println!(
        "Any ingress reaches any payment; any admin API shows the same deployments. Logs in {}/.\n\n\
         Create a payment through node 1, read it through node 3:\n  \
         curl -X POST {ingress1}/PaymentService/payment-001/CreatePayment \\\n    \
         -H 'Content-Type: application/json' \\\n    \
         -d '{{\"amount\": 10000, \"currency\": \"USD\", \"description\": \"Premium subscription\", \"customerId\": \"cust-alice\"}}'\n  \
         curl -X POST {}/PaymentService/payment-001/GetPayment -H 'Content-Type: application/json' -d '{{}}'\n\n\
         From another terminal:\n  \
         scripts/cluster.sh status        processes and restatectl status\n  \
         scripts/cluster.sh kill 2        SIGKILL node 2 (the other two keep serving)\n  \
         scripts/cluster.sh start 2       start it again on its data\n\n\
         State persists in {} across runs; use --fresh to start over.\nPress Ctrl-C to stop everything.\n",
        dir.display(),
        stack.ingress_url(2),
        dir.display(),
    );
    let died = wait_for_signal(&stack, false);
    let _ = std::fs::remove_file(&socket);
    drop(stack);
    died.map(|_| ())
}

/// Starts a stack on fixed ports in `dir` (kept between runs unless `fresh`), after checking
/// that the ports are free.
fn start_fixed(
    dir: &Path,
    fresh: bool,
    nodes: Vec<NodePorts>,
    service_port: u16,
    name: &str,
    gateway_process: &GatewayProcessArgs,
) -> anyhow::Result<Stack> {
    let gateway_port = gateway_process
        .gateway_process
        .then_some(gateway_process.gateway_port);
    for port in nodes
        .iter()
        .flat_map(|p| [p.ingress, p.admin, p.node])
        .chain([service_port])
        .chain(gateway_port)
    {
        if ports::in_use(port) {
            bail!("port {port} is already in use; move the stack's ports (see --help)");
        }
    }
    if fresh {
        eprintln!("stackctl: --fresh: deleting {}", dir.display());
        let _ = std::fs::remove_dir_all(dir);
    }
    // The service reads its settings as it would on its own: one parser, the service's.
    let config = Config::try_parse_from(["payment-service"]).context("the service's settings")?;
    let mut gateway = config.mock_gateway();
    if gateway_port.is_none() {
        gateway
            .ledger
            .get_or_insert_with(|| dir.join("gateway.ledger.jsonl"));
    }
    let nodes_n = nodes.len();
    eprintln!(
        "stackctl: starting {nodes_n} Restate node(s) and payment-service (logs in {})",
        dir.display()
    );
    let mut builder = Stack::builder()
        .nodes(nodes_n)
        .dir(dir)
        .fixed_ports(nodes, service_port)
        .cluster_name(name)
        .gateway(gateway)
        .identity_keys(config.identity_keys);
    // Unset: the build's own version (a new build, a new deployment; see `build_version`).
    if let Some(version) = config.deployment_version {
        builder = builder.deployment_version(version);
    }
    if let Some(port) = gateway_port {
        // Its webhooks (charges that settle later) go to the stack's ingress, signed with a
        // secret of the local stack's own.
        builder = builder
            .gateway_process()
            .gateway_port(port)
            .webhooks(LOCAL_WEBHOOK_SECRET);
    }
    let stack = builder.start()?;
    warn_of_older_builds(&stack);
    Ok(stack)
}

/// Says which older builds' deployments (kept in the data folder) still have invocations in
/// flight: pinned to their deployment, they wait for that build, which this stack no longer
/// runs (this build refuses their path).
fn warn_of_older_builds(stack: &Stack) {
    let admin = stack.live_admin();
    let current = stack.service_url();
    let Ok(deployments) = admin.deployments() else {
        return;
    };
    for (id, uri) in deployments {
        if uri.trim_end_matches('/') == current {
            continue;
        }
        match admin.unfinished_on(&id) {
            Ok(0) | Err(_) => {}
            Ok(n) => eprintln!(
                "stackctl: {n} invocation(s) started on an older build (deployment {id}, {uri}) \
                 wait for it: Restate retries them there until they pause. Run that build again \
                 until they finish, or cancel them (restate invocations cancel); then \
                 `restate deployments remove {id}`."
            ),
        }
    }
}

/// Blocks until SIGINT, SIGTERM or SIGHUP, reporting processes that die by themselves; with
/// `stop_on_death`, a death ends the wait too (and is returned).
fn wait_for_signal(stack: &Stack, stop_on_death: bool) -> anyhow::Result<Option<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut reported: Option<String> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = hup.recv() => break,
                _ = tick.tick() => {
                    let died = stack.died();
                    if died != reported {
                        if let Some(what) = &died {
                            eprintln!("stackctl: {what}");
                            if stop_on_death {
                                return Ok(died);
                            }
                        }
                        reported = died;
                    }
                }
            }
        }
        eprintln!("stackctl: stopping everything");
        Ok(None)
    })
}

/// Answers control commands, one per connection: a line in, lines out, the first `ok` or
/// `error: ...`.
fn serve_control(listener: &UnixListener, stack: &Stack) {
    for conn in listener.incoming().flatten() {
        let mut line = String::new();
        if BufReader::new(&conn).read_line(&mut line).is_err() {
            continue;
        }
        let answer = match control(stack, line.trim()) {
            Ok(text) => format!("ok\n{text}"),
            Err(e) => format!("error: {e:#}\n"),
        };
        let _ = (&conn).write_all(answer.as_bytes());
    }
}

fn control(stack: &Stack, command: &str) -> anyhow::Result<String> {
    let mut words = command.split_whitespace();
    let verb = words.next().unwrap_or_default();
    let node = || -> anyhow::Result<usize> {
        let n: usize = words.clone().next().unwrap_or_default().parse()?;
        anyhow::ensure!(
            (1..=stack.node_count()).contains(&n),
            "node must be 1 to {}",
            stack.node_count()
        );
        Ok(n - 1)
    };
    match verb {
        "status" => Ok(status(stack)),
        "kill" => {
            let i = node()?;
            anyhow::ensure!(
                stack.kill_node_unchecked(i),
                "{} is not running",
                stack.node_name(i)
            );
            Ok(format!("killed {} (SIGKILL)\n", stack.node_name(i)))
        }
        "stop" => {
            let i = node()?;
            anyhow::ensure!(stack.stop_node(i), "{} is not running", stack.node_name(i));
            Ok(format!("stopped {}\n", stack.node_name(i)))
        }
        "start" => {
            let i = node()?;
            let s = stack.start_node(i)?;
            Ok(format!(
                "started {}: healthy after {} ms, serving after {} ms\n",
                stack.node_name(i),
                s.healthy.as_millis(),
                s.serving.as_millis()
            ))
        }
        "wait-ready" => {
            let i = node()?;
            let took = stack.wait_node_ready(i)?;
            Ok(format!(
                "{} serves ({} ms)\n",
                stack.node_name(i),
                took.as_millis()
            ))
        }
        "kill-service" => {
            anyhow::ensure!(stack.kill_service(), "payment-service is not running");
            Ok("killed payment-service (SIGKILL)\n".into())
        }
        "kill-gateway" => {
            anyhow::ensure!(stack.kill_gateway()?, "mock-gateway is not running");
            Ok("killed mock-gateway (SIGKILL)\n".into())
        }
        "start-gateway" => {
            let took = stack.start_gateway()?;
            Ok(format!(
                "mock-gateway answers its health check after {} ms\n",
                took.as_millis()
            ))
        }
        "start-service" => {
            let took = stack.start_service()?;
            Ok(format!(
                "payment-service accepts connections after {} ms\n",
                took.as_millis()
            ))
        }
        other => bail!("unknown command {other:?}"),
    }
}

fn status(stack: &Stack) -> String {
    let mut out = String::new();
    for i in 0..stack.node_count() {
        match stack.node_pid(i) {
            Some(pid) => out.push_str(&format!(
                "{}  up (pid {pid}{})  ingress {}  admin {}\n",
                stack.node_name(i),
                if stack.is_ready(i) { ", serving" } else { "" },
                stack.ingress_url(i),
                stack.admin_url(i)
            )),
            None => out.push_str(&format!("{}  DOWN\n", stack.node_name(i))),
        }
    }
    match stack.service_pid() {
        Some(pid) => out.push_str(&format!(
            "payment-service  up (pid {pid})  {}\n",
            stack.service_url()
        )),
        None => out.push_str("payment-service  DOWN\n"),
    }
    if let Some(url) = stack.gateway_url() {
        match stack.gateway_pid() {
            Some(pid) => out.push_str(&format!("mock-gateway  up (pid {pid})  {url}\n")),
            None => out.push_str("mock-gateway  DOWN\n"),
        }
    }
    let addresses: Vec<String> = (0..stack.node_count())
        .map(|i| format!("http://127.0.0.1:{}", stack.node_ports(i).node))
        .collect();
    out.push_str(&format!("restatectl {}\n", addresses.join(",")));
    out
}

/// Sends one command to the cluster's owner; its answer.
fn ask(socket: &Path, command: &str) -> anyhow::Result<String> {
    let mut conn = UnixStream::connect(socket).with_context(|| {
        format!(
            "no cluster answers at {} (start one with scripts/run-cluster.sh)",
            socket.display()
        )
    })?;
    conn.write_all(format!("{command}\n").as_bytes())?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut conn, &mut answer)?;
    Ok(answer)
}

fn port_list(text: &str) -> anyhow::Result<Vec<u16>> {
    let ports: Vec<u16> = text
        .split_whitespace()
        .map(|p| {
            p.parse()
                .with_context(|| format!("not a port number: {p:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(ports.len() == 3, "3 ports needed, got {text:?}");
    Ok(ports)
}
