//! Hot reload: the config directory is read again when it changes (looked at every second,
//! [`crate::config::watch`]) or on SIGHUP. A valid new configuration is applied as a diff by
//! the IKE task ([`crate::control::Reload`]); an invalid one is refused as a whole, with
//! the file, document and field named, and the running one is kept. Both are counted in
//! `config_reloads_total{result}`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{self, Config, ConfigDiff};
use crate::control::Reload;
use crate::egroups::store_of;
use crate::sitedb::SiteStore;
use crate::state::Gateway;

/// How often the config directory is looked at.
const POLL: Duration = Duration::from_secs(1);

/// Whether a reload that changes nothing is applied (and counted).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Apply {
    /// Someone changed the directory or asked (SIGHUP).
    Always,
    /// Only a difference is worth a reload.
    IfChanged,
}

/// What reloads need besides the directory.
pub struct Reloader {
    pub dir: PathBuf,
    pub gateway: Arc<Gateway>,
    /// The gateway's own site store, for egroups without a `database` of their own.
    pub default_store: SiteStore,
    /// The IKE task (`None` with `--no-tunnels`: only the configuration shown changes).
    pub control: Option<mpsc::UnboundedSender<Reload>>,
}

impl Reloader {
    /// Watches the directory and SIGHUP until aborted.
    pub fn spawn(self) -> JoinHandle<()> {
        // Registered before the gateway says it is ready: from then on a SIGHUP reloads
        // instead of ending the process (its default action).
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!(error = %e, "cannot watch SIGHUP; reloading on changes only"))
            .ok();
        tokio::spawn(self.run(hangup))
    }

    async fn run(self, mut hangup: Option<tokio::signal::unix::Signal>) {
        let mut seen = self.fingerprint().await;
        // The directory may have changed between its first reading and this digest.
        self.reload("catching up with the directory", Apply::IfChanged)
            .await;
        // A change is read once the directory stayed the same for a whole poll: a user
        // saving several files is not caught half-way (and refused for it).
        let mut settling: Option<u64> = None;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                _ = tick.tick() => {
                    let now = self.fingerprint().await;
                    if now == seen {
                        settling = None;
                        continue;
                    }
                    if settling != Some(now) {
                        settling = Some(now);
                        continue;
                    }
                    settling = None;
                    seen = now;
                    "the config directory changed"
                }
                Some(()) = async { hangup.as_mut()?.recv().await } => {
                    seen = self.fingerprint().await;
                    settling = None;
                    "SIGHUP"
                }
            };
            self.reload(why, Apply::Always).await;
        }
    }

    async fn fingerprint(&self) -> u64 {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || config::watch::fingerprint(&dir))
            .await
            .unwrap_or_default()
    }

    /// Reads the directory and applies what changed, or refuses it all.
    async fn reload(&self, why: &str, when: Apply) {
        let dir = self.dir.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load_dir(&dir)).await;
        let new = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return self.refuse(why, &e),
            Err(e) => return self.refuse(why, &e),
        };
        let diff = ConfigDiff::between(&self.gateway.config(), &new);
        if when == Apply::IfChanged && diff.is_empty() {
            return;
        }
        let stores = match self.open_stores(&new, &diff).await {
            Ok(s) => s,
            Err(e) => return self.refuse(why, &e),
        };
        let new = Arc::new(new);
        if let Some(control) = &self.control {
            let reload = Reload {
                config: new.clone(),
                diff: diff.clone(),
                stores,
            };
            if control.send(reload).is_err() {
                tracing::warn!("the IKE task has stopped: configuration not applied");
                return;
            }
        }
        self.gateway.set_config(new);
        self.gateway.metrics.count_config_reload("applied");
        tracing::info!(trigger = why, %diff, "new configuration applied");
    }

    /// The site stores of the egroups that are new or changed. One that cannot be opened
    /// (a malformed URL) refuses the configuration: the running one would keep serving its
    /// sites, the new one none.
    async fn open_stores(
        &self,
        new: &Config,
        diff: &ConfigDiff,
    ) -> Result<BTreeMap<String, Option<SiteStore>>, String> {
        let mut stores = BTreeMap::new();
        for name in diff.egroups.new_or_changed() {
            let Some(spec) = new.set.egroups.get(name) else {
                continue;
            };
            let store = store_of(new, name, spec, Some(&self.default_store))
                .await
                .map_err(|e| format!("Egroup '{name}': spec.database: {e}"))?;
            stores.insert(name.clone(), store);
        }
        Ok(stores)
    }

    fn refuse(&self, why: &str, error: &dyn std::fmt::Display) {
        self.gateway.metrics.count_config_reload("refused");
        tracing::error!(
            trigger = why,
            dir = %self.dir.display(),
            %error,
            "new configuration refused: the running one is kept"
        );
    }
}
