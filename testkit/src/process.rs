//! Child processes the harness owns: spawned with their output in a log file, in a process
//! group of their own, killed by the kernel if the harness dies, and stopped when dropped.
//!
//! * A [`Proc`] owns its `std::process::Child`. The child is reaped only by [`Proc::kill`],
//!   [`Proc::stop`] or the drop, so its pid cannot be reused while the handle exists: a pid is
//!   never signalled after its process is gone.
//! * Children are spawned from one spawner thread that lives as long as the harness, with
//!   `PR_SET_PDEATHSIG = SIGKILL` (the signal fires when the spawning *thread* dies): nothing
//!   outlives a test binary or `stackctl`, not even on SIGKILL or Ctrl-C.
//! * [`Restartable`] is a process that can be SIGKILLed and started again in place (same
//!   command, same log): a node of a cluster, the service under a crash test.
//! * [`install_exit_hook`] stops whatever is still running at `exit()` (a static stack shared
//!   by the tests of one binary is never dropped) and removes [`temp_dir`]s.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long a process gets between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(10);

/// Pids (and process groups) of live children, for the exit hook.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Temporary directories to remove at exit.
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static KEEP_TEMP_DIRS: AtomicBool = AtomicBool::new(false);

/// Locks `m`, also after a panic in another thread poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child process of the harness (see the module doc).
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` as `name`, with stdin closed and stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> io::Result<Self> {
        install_exit_hook();
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let out = File::options().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // SAFETY: only async-signal-safe calls (prctl, getppid, setpgid) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The spawner may have died before prctl took effect.
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
        lock(&LIVE).push(child.id());
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` once the process has exited by itself.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().ok().flatten();
        if status.is_some() {
            // Reaped: its pid is free again, and the exit hook must not signal it.
            let pid = self.child.id();
            lock(&LIVE).retain(|&p| p != pid);
        }
        status
    }

    /// A crash: SIGKILL to the whole process group, no grace; returns once it is reaped.
    pub fn kill(mut self) -> Option<ExitStatus> {
        self.signal_group(libc::SIGKILL);
        self.reap()
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    pub fn stop(self, grace: Duration) -> Option<ExitStatus> {
        stop_all(vec![self], grace).pop().flatten()
    }

    /// The last `lines` lines of its log.
    pub fn tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    fn signal_group(&mut self, signal: libc::c_int) {
        if self.exited().is_none() {
            // SAFETY: kill(2) on the child's own process group (setpgid in pre_exec); the child
            // is not reaped yet, so the group is still ours.
            unsafe {
                libc::kill(-(self.child.id() as libc::pid_t), signal);
            }
        }
    }

    fn reap(&mut self) -> Option<ExitStatus> {
        // Whatever else is left in its group (e.g. a wrapper's child), only while the leader
        // is not reaped yet: until then it holds the group id, which so is no one else's.
        // (`signal_group` checks with `try_wait`, which reaps a leader that has exited.)
        self.signal_group(libc::SIGKILL);
        let status = self.child.wait().ok();
        let pid = self.child.id();
        lock(&LIVE).retain(|&p| p != pid);
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id();
        if lock(&LIVE).contains(&pid) {
            self.signal_group(libc::SIGTERM);
            wait_until_exited(std::slice::from_mut(self), GRACE);
            self.signal_group(libc::SIGKILL);
            self.reap();
        }
    }
}

/// Stops several processes together: SIGTERM to all, up to `grace`, then SIGKILL (e.g. the
/// nodes of a cluster, which one at a time would wait for a quorum that is gone).
pub fn stop_all(mut procs: Vec<Proc>, grace: Duration) -> Vec<Option<ExitStatus>> {
    for p in &mut procs {
        p.signal_group(libc::SIGTERM);
    }
    wait_until_exited(&mut procs, grace);
    procs
        .iter_mut()
        .map(|p| {
            if p.exited().is_none() {
                eprintln!(
                    "testkit: {} (pid {}) ignored SIGTERM for {grace:?}, killing it",
                    p.name,
                    p.pid()
                );
                p.signal_group(libc::SIGKILL);
            }
            p.reap()
        })
        .collect()
}

fn wait_until_exited(procs: &mut [Proc], grace: Duration) {
    let deadline = Instant::now() + grace;
    while procs.iter_mut().any(|p| p.exited().is_none()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process that can be SIGKILLed and started again in place: the same command (ports, data
/// folder, environment), the same log. Shared between threads (a crash test kills from one and
/// calls from others).
pub struct Restartable {
    name: String,
    command: Box<dyn Fn() -> Command + Send + Sync>,
    log: PathBuf,
    running: Mutex<Option<Proc>>,
}

impl Restartable {
    /// Not started yet: see [`Restartable::start`].
    pub fn new(
        name: impl Into<String>,
        log: PathBuf,
        command: impl Fn() -> Command + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            command: Box::new(command),
            log,
            running: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> Option<u32> {
        lock(&self.running).as_ref().map(Proc::pid)
    }

    /// Starts it (it must be down).
    pub fn start(&self) -> anyhow::Result<()> {
        let mut slot = lock(&self.running);
        anyhow::ensure!(slot.is_none(), "{} is already running", self.name);
        *slot = Some(Proc::spawn(&self.name, (self.command)(), &self.log)?);
        Ok(())
    }

    /// SIGKILL, as a crash; `false` if it was not running.
    pub fn kill(&self) -> bool {
        lock(&self.running).take().map(Proc::kill).is_some()
    }

    /// Takes the running process out (e.g. to stop several together); `None` if down.
    pub fn take(&self) -> Option<Proc> {
        lock(&self.running).take()
    }

    /// SIGTERM, then SIGKILL after `grace`; `false` if it was not running.
    pub fn stop(&self, grace: Duration) -> bool {
        self.take().map(|p| p.stop(grace)).is_some()
    }

    /// `Some(status)` if it should run and has exited by itself.
    pub fn died(&self) -> Option<ExitStatus> {
        lock(&self.running).as_mut().and_then(Proc::exited)
    }

    /// Forgets a process that exited by itself (reaping it), so that it can be started again.
    /// Returns whether there was one.
    pub fn clear_if_dead(&self) -> bool {
        let mut slot = lock(&self.running);
        if slot.as_mut().and_then(Proc::exited).is_some() {
            slot.take().map(Proc::kill);
            return true;
        }
        false
    }

    pub fn tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    static ON_SPAWNER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on the spawner thread (which never exits: the children's PDEATHSIG is tied to it).
fn on_spawner<T, F>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    static SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
    if ON_SPAWNER.with(std::cell::Cell::get) {
        return f();
    }
    let jobs = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                ON_SPAWNER.with(|on| on.set(true));
                for job in rx {
                    job();
                }
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn the spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    lock(jobs)
        .send(Box::new(move || {
            let _ = tx.send(f());
        }))
        .expect("the spawner thread is gone");
    rx.recv().expect("the spawner thread died")
}

/// Makes a fresh temporary directory, removed at exit unless [`keep_temp_dirs`] was called or
/// `TESTKIT_KEEP_TMP` is set.
pub fn temp_dir(prefix: &str) -> io::Result<PathBuf> {
    install_exit_hook();
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?.keep();
    lock(&TEMP_DIRS).push(dir.clone());
    Ok(dir)
}

/// Keeps the temporary directories at exit (after a failure: logs, ledger, data).
pub fn keep_temp_dirs() {
    KEEP_TEMP_DIRS.store(true, Ordering::SeqCst);
}

/// Registers the exit hook once.
pub fn install_exit_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: registering a plain `extern "C" fn()` with libc's atexit.
        unsafe {
            libc::atexit(cleanup_at_exit);
        }
    });
}

extern "C" fn cleanup_at_exit() {
    // Never panic across the FFI boundary, never block on a lock held elsewhere.
    let _ = std::panic::catch_unwind(|| {
        if let Ok(live) = LIVE.try_lock() {
            let mut left: HashSet<u32> = live.iter().copied().collect();
            for &pid in &left {
                // SAFETY: kill(2) on a child's group; the children are not reaped yet.
                unsafe {
                    libc::kill(-(pid as libc::pid_t), libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while !left.is_empty() && Instant::now() < deadline {
                left.retain(|&pid| {
                    let mut status = 0;
                    // SAFETY: waitpid on our own child, non-blocking.
                    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) == 0 }
                });
                std::thread::sleep(Duration::from_millis(20));
            }
            for pid in left {
                // SAFETY: as above.
                unsafe {
                    libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
                }
            }
        }
        let keep =
            std::env::var_os("TESTKIT_KEEP_TMP").is_some() || KEEP_TEMP_DIRS.load(Ordering::SeqCst);
        if let Ok(dirs) = TEMP_DIRS.try_lock() {
            for dir in dirs.iter() {
                if keep {
                    eprintln!("testkit: kept {}", dir.display());
                } else {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_process_is_reaped_and_a_restartable_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let sleeper = Restartable::new("sleep", dir.path().join("sleep.log"), || {
            let mut c = Command::new("sleep");
            c.arg("30");
            c
        });
        sleeper.start().unwrap();
        let pid = sleeper.pid().unwrap();
        assert!(sleeper.start().is_err(), "started twice");
        assert!(sleeper.kill());
        assert!(!sleeper.kill(), "killed a process that is gone");
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        sleeper.start().unwrap();
        assert_ne!(sleeper.pid(), None);
        assert!(sleeper.stop(Duration::from_secs(2)));
    }

    #[test]
    fn dropping_a_proc_stops_it_and_an_exit_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let mut quick =
            Proc::spawn("true", Command::new("true"), &dir.path().join("t.log")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while quick.exited().is_none() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let slow = Proc::spawn("sleep", cmd, &dir.path().join("s.log")).unwrap();
        let pid = slow.pid();
        drop(slow);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
