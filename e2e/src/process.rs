//! Running commands with a timeout, and daemons that die with their owner.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::logs;
use crate::wait::{self, Probe};

/// Timeout for short administrative commands (`ip`, `swanctl --load-all`, ...).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// `program arg arg ...` of a command, for messages.
pub fn display(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Runs `cmd` to completion (stdin closed, stdout and stderr captured), killing it after
/// `timeout`. Returns the output whatever the exit status.
pub fn output(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let shown = display(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning `{shown}`"))?;
    let stdout = reader(child.stdout.take());
    let stderr = reader(child.stderr.take());
    let waited = wait::until(format!("`{shown}` to exit"), timeout, || {
        Ok(match child.try_wait()? {
            Some(status) => Probe::Ready(status),
            None => Probe::pending("still running"),
        })
    });
    let status = match waited {
        Ok(status) => status,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            // The reader threads are left to finish on their own: a grandchild that inherited
            // the pipes may keep them open.
            return Err(e.context(format!("killed `{shown}`")));
        }
    };
    Ok(Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    })
}

/// Like [`output`], but a non-zero exit is an error carrying the command, status, stdout and
/// stderr. Returns stdout as text.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let shown = display(cmd);
    let out = output(cmd, timeout)?;
    check(&shown, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An error unless `out` has a successful exit status.
pub fn check(shown: &str, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({})\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn reader(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut p| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            buf
        })
    })
}

fn join(handle: Option<JoinHandle<Vec<u8>>>) -> Vec<u8> {
    handle.and_then(|h| h.join().ok()).unwrap_or_default()
}

/// A long-running child process with stdout and stderr appended to a log file. Dropping it
/// kills it (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Daemon {
    /// Spawns `cmd` with stdin closed and output appended to `log`. `name` is used in
    /// messages.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let shown = display(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawning {name}: `{shown}`"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            exited: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the stdout/stderr log.
    pub fn log_tail(&self, lines: usize) -> String {
        logs::tail(&self.log, lines)
    }

    /// The exit status if the process has ended, without blocking.
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .with_context(|| format!("checking on {}", self.name))?;
        }
        Ok(self.exited)
    }

    /// An error (with the log tail) if the process has exited. Call it from wait probes so a
    /// daemon that dies at startup fails the wait at once.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.exit_status()? {
            bail!(
                "{} (pid {}) exited: {status}\n{}",
                self.name,
                self.pid(),
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// Waits until the log holds `needle` (e.g. a "ready" line); fails at once if the
    /// process exits first.
    pub fn wait_logged(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let log = self.log.clone();
        wait::until(format!("{} to log {needle:?}", self.name), timeout, || {
            self.ensure_running()?;
            Ok(if logs::contains(&log, needle) {
                Probe::Ready(())
            } else {
                Probe::pending(self.log_tail(10))
            })
        })
    }

    /// Kills (SIGKILL) and reaps the process. Idempotent.
    pub fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Clock ticks per second of `/proc` CPU times (`getconf CLK_TCK`; 100 if it cannot say).
pub fn clock_ticks() -> f64 {
    run(Command::new("getconf").arg("CLK_TCK"), COMMAND_TIMEOUT)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system, all threads) of process `pid` so far, with `ticks` from
/// [`clock_ticks`]; 0 for a process that is gone.
pub fn cpu_seconds(pid: u32, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The name in parentheses may hold spaces: count fields after its ')'.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
    let field = |i: usize| rest.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / ticks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_captures_output_and_reports_failure() {
        let out = run(Command::new("sh").args(["-c", "echo hi"]), COMMAND_TIMEOUT).unwrap();
        assert_eq!(out, "hi\n");
        let err = run(
            Command::new("sh").args(["-c", "echo oops >&2; exit 3"]),
            COMMAND_TIMEOUT,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("oops") && msg.contains("exit status: 3"), "{msg}");
    }

    #[test]
    fn output_times_out() {
        let err = output(
            Command::new("sh").args(["-c", "sleep 5"]),
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("timed out"), "{err:#}");
    }

    #[test]
    fn daemon_death_is_reported_with_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo starting; exit 7"]);
        let mut d = Daemon::spawn("dies", cmd, &log).unwrap();
        let err = wait::until("dies to run", Duration::from_secs(5), || {
            d.ensure_running()?;
            Ok(Probe::<()>::pending("running"))
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("exit status: 7") && msg.contains("starting"),
            "{msg}"
        );
    }

    #[test]
    fn drop_kills() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let d = Daemon::spawn("sleeper", cmd, &dir.path().join("log")).unwrap();
        let pid = d.pid();
        drop(d);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
