//! The service keeps accepting after an accept error: with a low file-descriptor limit, a
//! burst of connections runs it out of descriptors (accept fails with EMFILE); once they are
//! closed, it serves again (the SDK's own accept loop stops for good after one such error).

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use testkit::process::Proc;
use testkit::stack::wait_until;

/// Descriptors the service may hold: enough to start, far fewer than the burst below.
const FD_LIMIT: libc::rlim_t = 48;

#[test]
fn the_service_accepts_again_after_running_out_of_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let port = testkit::ports::pick().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_payment-service"));
    cmd.arg(format!("--bind=127.0.0.1:{port}"));
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: FD_LIMIT,
                rlim_max: FD_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let log = dir.path().join("payment-service.log");
    let service = Proc::spawn("payment-service", cmd, &log).unwrap();
    let health = format!("http://127.0.0.1:{port}/health");
    let http = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let healthy = || {
        http.get(&health)
            .send()
            .is_ok_and(|r| r.status().is_success())
    };
    wait_until(
        Duration::from_secs(20),
        "the service to serve /health",
        || Ok(healthy()),
    )
    .unwrap();

    // More connections than it has descriptors: accept fails with EMFILE.
    let burst: Vec<TcpStream> = (0..2 * FD_LIMIT)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    wait_until(
        Duration::from_secs(10),
        "an accept error in the log",
        || Ok(std::fs::read_to_string(&log)?.contains("accepting a connection failed")),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", service.tail(20)));
    drop(burst);

    wait_until(
        Duration::from_secs(10),
        "the service to serve again",
        || Ok(healthy()),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", service.tail(20)));
}
