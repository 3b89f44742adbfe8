//! Child-process plumbing for the local test stack: free ports, log capture,
//! a spawner thread that owns the children, and cleanup at process exit.
//!
//! Children never outlive the test binary:
//! * they are spawned from one dedicated spawner thread that never returns
//!   (whichever thread calls [`spawn_logged`]), with `PR_SET_PDEATHSIG =
//!   SIGKILL` (the signal fires when the *spawning thread* dies, i.e. when the
//!   test process dies, even on SIGKILL); so a child can be (re)started from
//!   any thread, e.g. by a crash test restarting what it just killed;
//! * each child leads its own process group, and an `atexit` hook sends
//!   SIGTERM to every group (then SIGKILL after a grace period), reaps the
//!   children and removes the temporary directory (kept when
//!   `PAYMENT_TEST_KEEP_TMP` is set).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Children spawned by the harness, reaped by [`cleanup_at_exit`].
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());
/// Temporary directories to remove at exit.
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Set by [`keep_temp_dirs`]: the exit hook leaves the temporary directories.
static KEEP_TEMP_DIRS: AtomicBool = AtomicBool::new(false);

/// How long the exit hook waits for SIGTERM to work before SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Registers the exit hook once (idempotent).
pub fn install_exit_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: registering a plain `extern "C" fn()` with libc's atexit.
        unsafe {
            libc::atexit(cleanup_at_exit);
        }
    });
}

/// Makes a fresh temporary directory that the exit hook removes.
pub fn temp_dir() -> io::Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("payment-service-test-")
        .tempdir()?
        .keep();
    TEMP_DIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir.clone());
    Ok(dir)
}

/// Keeps the temporary directories at exit (e.g. after a failed crash run,
/// for the logs, the ledger and the server's data), as `PAYMENT_TEST_KEEP_TMP`
/// does.
pub fn keep_temp_dirs() {
    KEEP_TEMP_DIRS.store(true, Ordering::SeqCst);
}

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    static ON_SPAWNER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on the spawner thread, a thread that lives until the process
/// exits (children's PDEATHSIG is tied to it), and returns what `f` returned.
fn on_spawner<T, F>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    static SPAWNER: OnceLock<Sender<Job>> = OnceLock::new();
    if ON_SPAWNER.with(std::cell::Cell::get) {
        return f();
    }
    let jobs = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("test-stack-spawner".into())
            .spawn(move || {
                ON_SPAWNER.with(|on| on.set(true));
                for job in rx {
                    job();
                }
                // Unreachable (the sender is a static), but never exit: see above.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn the spawner thread");
        tx
    });
    let (tx, rx) = mpsc::channel();
    jobs.send(Box::new(move || {
        let _ = tx.send(f());
    }))
    .expect("the spawner thread is gone");
    rx.recv().expect("the spawner thread died")
}

/// Spawns `cmd` with stdout and stderr appended to `log`, in its own process
/// group, killed by the kernel if the test process dies. Callable from any
/// thread (the spawn itself happens on the spawner thread). Returns the
/// child's pid.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> io::Result<u32> {
    let out = File::options().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    // SAFETY: only async-signal-safe calls (prctl, setpgid, getppid) between
    // fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() == 1 {
                return Err(io::Error::other("parent died before exec"));
            }
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = on_spawner(move || cmd.spawn())?;
    let pid = child.id();
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child);
    Ok(pid)
}

/// `Some(status)` if the child with `pid` has exited.
pub fn exited(pid: u32) -> Option<std::process::ExitStatus> {
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    let child = children.iter_mut().find(|c| c.id() == pid)?;
    child.try_wait().ok().flatten()
}

/// Stops one child now (SIGTERM, then SIGKILL), e.g. after a failed start.
pub fn stop(pid: u32) {
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pos) = children.iter().position(|c| c.id() == pid) {
        let mut child = children.remove(pos);
        terminate(std::slice::from_mut(&mut child));
    }
}

/// Stops several children together (SIGTERM to all, then SIGKILL after the grace period),
/// e.g. the nodes of a cluster, which one at a time would wait for a quorum that is gone.
pub fn stop_all(pids: &[u32]) {
    let mut stopping = {
        let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
        let mut stopping = Vec::new();
        let mut i = 0;
        while i < children.len() {
            if pids.contains(&children[i].id()) {
                stopping.push(children.remove(i));
            } else {
                i += 1;
            }
        }
        stopping
    };
    terminate(&mut stopping);
}

/// Crashes one child: SIGKILL to its process group, no grace, then reaps it.
/// Returns how it ended, or `None` if `pid` is not a child of ours.
pub fn kill(pid: u32) -> Option<ExitStatus> {
    let mut child = {
        let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
        let pos = children.iter().position(|c| c.id() == pid)?;
        children.remove(pos)
    };
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // SAFETY: plain kill(2) on the child's own process group (setpgid in pre_exec).
    unsafe {
        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
    }
    child.wait().ok()
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `true` once something accepts TCP connections on `addr`.
pub fn tcp_accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The last `lines` lines of a log file (best effort).
pub fn tail(path: &Path, lines: usize) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let Ok(mut f) = File::open(path) else {
        return format!("<no log at {}>", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn terminate(children: &mut [Child]) {
    for child in children.iter() {
        // Negative pid: the child's whole process group (setpgid in pre_exec).
        // SAFETY: plain kill(2).
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + EXIT_GRACE;
    loop {
        let running = children
            .iter_mut()
            .map(|c| c.try_wait())
            .filter(|r| matches!(r, Ok(None)))
            .count();
        if running == 0 || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for child in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!(
                "test stack: pid {} ignored SIGTERM for {:?}, killing it",
                child.id(),
                EXIT_GRACE
            );
            // SAFETY: plain kill(2).
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

extern "C" fn cleanup_at_exit() {
    // Never panic across the FFI boundary, never block on a poisoned lock.
    let _ = std::panic::catch_unwind(|| {
        if let Ok(mut children) = CHILDREN.try_lock() {
            terminate(&mut children);
            children.clear();
        }
        let keep = std::env::var_os("PAYMENT_TEST_KEEP_TMP").is_some()
            || KEEP_TEMP_DIRS.load(Ordering::SeqCst);
        if let Ok(dirs) = TEMP_DIRS.try_lock() {
            for dir in dirs.iter() {
                if keep {
                    eprintln!("test stack: kept {}", dir.display());
                } else {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
    });
}
