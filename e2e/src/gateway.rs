//! Our own `concentrator-gateway` in a namespace: started from a config directory and waited
//! for, its metrics read and waited on. The binary's path comes from the caller (Cargo gives
//! it to the gateway's integration tests as `CARGO_BIN_EXE_concentrator-gateway`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::logs;
use crate::netns::Netns;
use crate::process::Daemon;
use crate::wait::{self, Probe};

/// How long a gateway may take to log that it is ready.
const READY: Duration = Duration::from_secs(20);

/// A running gateway and its log.
pub struct Gateway {
    pub daemon: Daemon,
    pub log: PathBuf,
}

impl Gateway {
    /// Starts `bin` in `ns` with `<dir>/<name>-config` as its config directory and
    /// `<dir>/<name>-data` as its data directory, IKE on `listen`, plus `extra` arguments;
    /// returns once it logged "gateway ready".
    pub fn start(
        ns: &Netns,
        bin: &Path,
        dir: &Path,
        name: &str,
        listen: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let config = dir.join(format!("{name}-config"));
        let data = dir.join(format!("{name}-data"));
        let log = dir.join(format!("{name}.log"));
        let mut args = vec![
            "--config-dir",
            config.to_str().context("config path")?,
            "--data-dir",
            data.to_str().context("data path")?,
            "--ike-listen",
            listen,
        ];
        args.extend_from_slice(extra);
        let mut daemon = ns.spawn(name, bin, &args, &log)?;
        wait_ready(&mut daemon, READY)?;
        Ok(Self { daemon, log })
    }

    /// The last `lines` of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        logs::tail(&self.log, lines)
    }
}

/// Waits until a started gateway logs that it serves (fails at once if it exits).
pub fn wait_ready(daemon: &mut Daemon, timeout: Duration) -> Result<()> {
    daemon.wait_logged("gateway ready", timeout)
}

/// A metric of the gateway running in `ns` (its `/metrics` on the namespace's loopback),
/// summed over the label sets whose line starts with `name` (so a name with a label set picks
/// that one).
pub fn metric(ns: &Netns, name: &str) -> Result<f64> {
    let text = ns.run("curl", &["-sf", "http://127.0.0.1:9090/metrics"])?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Waits until [`metric`] of `name` is `want`.
pub fn wait_metric(ns: &Netns, name: &str, want: f64, timeout: Duration) -> Result<()> {
    wait::until(format!("{name} = {want}"), timeout, || {
        let v = metric(ns, name)?;
        Ok(if (v - want).abs() < f64::EPSILON {
            Probe::Ready(())
        } else {
            Probe::pending(format!("{name} = {v}"))
        })
    })
}
