//! A stack owned by one test, that the test may crash: restate-server and
//! payment-service on fixed ports chosen at start, each of which can be
//! SIGKILLed and started again on the same ports, the server on the same data
//! dir and the service on the same gateway ledger, without registering again.
//!
//! ```ignore
//! let stack = OwnedStack::start(&[("GATEWAY_RESPONSE_DELAY_MS", "100".into())])?;
//! stack.kill_service();
//! stack.start_service()?;   // same port, same ledger: Restate retries into it
//! stack.kill_server();
//! stack.start_server()?;    // same ports and data: waits until healthy
//! ```
//!
//! Unlike [`super::stack`], nothing is shared with other tests, and
//! the external mode is not supported (a remote stack cannot be killed).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use reqwest::blocking::Client;

use super::{
    REQUEST_TIMEOUT, START_ATTEMPTS, ServerPorts, ServiceProcess, TestApp, checked_server_binary,
    http_client, lock, process, register, spawn_server, wait_for_ingress, wait_server,
};

/// restate-server and payment-service, each killable and restartable in place.
pub struct OwnedStack {
    /// Helpers (ingress calls, admin SQL, ledger) pointing at this stack.
    pub app: TestApp,
    /// Temp dir: logs, the gateway ledger, the server's data.
    pub dir: PathBuf,
    server_bin: PathBuf,
    base_dir: PathBuf,
    ports: ServerPorts,
    server_env: Vec<(String, String)>,
    server_pid: Mutex<Option<u32>>,
    service: ServiceProcess,
    probe: Client,
}

impl OwnedStack {
    /// Starts the server and the service (with `service_env` added to the
    /// service's environment, e.g. the gateway's settings), registers the
    /// service and waits until the ingress knows it.
    pub fn start(service_env: &[(&str, String)]) -> anyhow::Result<Self> {
        Self::start_with(&[], service_env)
    }

    /// [`Self::start`], with `server_env` added to restate-server's environment
    /// (e.g. a request-identity signing key).
    pub fn start_with(
        server_env: &[(&str, String)],
        service_env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let owned = |env: &[(&str, String)]| -> Vec<(String, String)> {
            env.iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect()
        };
        let (server_env, service_env) = (owned(server_env), owned(service_env));
        process::install_exit_hook();
        let dir = process::temp_dir().context("creating the temp dir")?;
        let probe = http_client(Duration::from_secs(2))?;
        let server_bin = checked_server_binary()?;
        let base_dir = dir.join("restate-data");
        let ledger = dir.join("gateway-ledger.jsonl");

        // Fresh ports per attempt, in case one was taken in the meantime.
        let mut last_error = None;
        let mut started = None;
        for attempt in 1..=START_ATTEMPTS {
            let ports = ServerPorts::free()?;
            let pid = spawn_server(
                &server_bin,
                &base_dir,
                ports,
                &dir.join(SERVER_LOG),
                &server_env,
            )?;
            match wait_server(&probe, pid, ports) {
                Ok(()) => {
                    started = Some((ports, pid));
                    break;
                }
                Err(e) => {
                    eprintln!("restate-server start attempt {attempt} failed: {e:#}");
                    process::stop(pid);
                    let _ = std::fs::remove_dir_all(&base_dir);
                    last_error = Some(e);
                }
            }
        }
        let Some((ports, server_pid)) = started else {
            return Err(last_error.unwrap_or_else(|| anyhow!("no attempt made")));
        };

        let service_addr: SocketAddr = ([127, 0, 0, 1], process::free_port()?).into();
        let service_log = dir.join(SERVICE_LOG);
        let stack = Self {
            app: TestApp {
                ingress: ports.ingress_url(),
                admin: ports.admin_url(),
                service_url: format!("http://{service_addr}"),
                ledger: Some(ledger.clone()),
                dir: Some(dir.clone()),
                client: http_client(REQUEST_TIMEOUT)?,
            },
            dir,
            server_bin,
            base_dir,
            ports,
            server_env,
            server_pid: Mutex::new(Some(server_pid)),
            service: ServiceProcess::new(service_addr, service_env, ledger, service_log),
            probe,
        };
        stack.start_service()?;
        let service_pid = stack.service_pid().expect("just started");
        let service_log = &stack.service.log;
        let alive = || match process::exited(service_pid) {
            Some(status) => Err(anyhow!(
                "payment-service exited ({status}):\n{}",
                process::tail(service_log, 40)
            )),
            None => Ok(()),
        };
        register(
            &stack.probe,
            &stack.app.admin,
            &stack.app.service_url,
            &alive,
        )
        .with_context(|| format!("registering {}\n{}", stack.app.service_url, stack.logs()))?;
        wait_for_ingress(&stack.probe, &stack.app.ingress)?;
        Ok(stack)
    }

    /// The gateway ledger of the service.
    pub fn ledger(&self) -> &Path {
        &self.service.ledger
    }

    pub fn server_pid(&self) -> Option<u32> {
        *lock(&self.server_pid)
    }

    pub fn service_pid(&self) -> Option<u32> {
        self.service.pid()
    }

    /// SIGKILLs the service (a crash: no graceful shutdown); `false` if it
    /// was not running.
    pub fn kill_service(&self) -> bool {
        self.service.kill()
    }

    /// Starts the service on its port (it must be down); returns once it
    /// accepts connections, with how long that took.
    pub fn start_service(&self) -> anyhow::Result<Duration> {
        self.service.start()
    }

    /// SIGKILLs restate-server; `false` if it was not running.
    pub fn kill_server(&self) -> bool {
        lock(&self.server_pid)
            .take()
            .and_then(process::kill)
            .is_some()
    }

    /// Starts restate-server on its ports and data dir (it must be down);
    /// returns once it is healthy again, with how long that took.
    pub fn start_server(&self) -> anyhow::Result<Duration> {
        let mut slot = lock(&self.server_pid);
        anyhow::ensure!(slot.is_none(), "restate-server is already running");
        let began = Instant::now();
        let log = self.dir.join(SERVER_LOG);
        let pid = spawn_server(
            &self.server_bin,
            &self.base_dir,
            self.ports,
            &log,
            &self.server_env,
        )?;
        if let Err(e) = wait_server(&self.probe, pid, self.ports) {
            process::kill(pid);
            return Err(e.context(format!("--- {SERVER_LOG} ---\n{}", process::tail(&log, 60))));
        }
        *slot = Some(pid);
        Ok(began.elapsed())
    }

    /// `Some(message)` if a process that should run has exited by itself.
    pub fn died(&self) -> Option<String> {
        for (name, slot) in [
            ("restate-server", &self.server_pid),
            ("payment-service", &self.service.pid),
        ] {
            if let Some(pid) = *lock(slot)
                && let Some(status) = process::exited(pid)
            {
                return Some(format!("{name} (pid {pid}) exited by itself: {status}"));
            }
        }
        None
    }

    /// Starts whichever of the two is down (killed, or exited by itself), server first.
    pub fn ensure_up(&self) -> anyhow::Result<()> {
        for slot in [&self.server_pid, &self.service.pid] {
            let mut slot = lock(slot);
            if let Some(pid) = *slot
                && process::exited(pid).is_some()
            {
                process::kill(pid); // reaps it
                *slot = None;
            }
        }
        if self.server_pid().is_none() {
            self.start_server()?;
        }
        if self.service_pid().is_none() {
            self.start_service()?;
        }
        Ok(())
    }

    /// Stops both processes gracefully (SIGTERM, then SIGKILL after a grace period).
    pub fn stop(&self) {
        for slot in [&self.service.pid, &self.server_pid] {
            if let Some(pid) = lock(slot).take() {
                process::stop(pid);
            }
        }
    }

    /// Log tails of both processes, for failure messages.
    pub fn logs(&self) -> String {
        self.app.logs()
    }
}

const SERVER_LOG: &str = "restate-server.log";
const SERVICE_LOG: &str = "payment-service.log";
