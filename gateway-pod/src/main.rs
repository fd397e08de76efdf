use std::process::ExitCode;

use clap::Parser;
use concentrator_gateway::cli::{Command, SitesCommand};
use concentrator_gateway::{Options, config, open_site_store, start, summary};

fn main() -> ExitCode {
    let opts = Options::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // A fleet member runs one IKE worker (`control::start`).
    let ike_workers = if opts.fleet_etcd.is_empty() {
        opts.ike_workers
    } else {
        1
    };
    if let Some(n) = control_threads(ike_workers) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("concentrator-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(opts))
}

/// Threads of the runtime that runs IKE, the admin API, metrics and site lookups: half the
/// cores (at least one), and at least one per IKE worker (`ike_workers`), which would
/// otherwise take turns on fewer threads. The data plane has a thread per core of its own,
/// and a thread per core here as well only competed with it while IKE ran on one task: on
/// 2 cores, one thread here instead of two gave 19% more IKE establishments per core
/// (6,098 -> 7,246/s, BENCHMARKS.md). A set `TOKIO_WORKER_THREADS` still decides.
fn control_threads(ike_workers: usize) -> Option<usize> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    Some((cores / 2).max(1).max(ike_workers))
}

/// `esp-static`: one tunnel with hand-made SAs, until stopped.
async fn esp_static(args: &concentrator_gateway::cli::EspStaticArgs) -> ExitCode {
    let tunnel = match concentrator_gateway::static_tunnel(args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("concentrator-gateway esp-static: {e}");
            return ExitCode::from(2);
        }
    };
    let counters = concentrator_gateway::dataplane::shared::DataplaneCounters::default();
    let stop = StopSignals::register();
    println!("esp-static: {} -> {} up", args.local, args.peer);
    tokio::select! {
        r = concentrator_gateway::dataplane::run(tunnel, counters.clone()) => {
            if let Err(e) = r {
                eprintln!("concentrator-gateway esp-static: {e}");
                return ExitCode::FAILURE;
            }
        }
        () = stop.wait() => {}
    }
    println!(
        "esp-static: out {} in {} dropped {} policy-dropped {} too-big {}",
        counters.packets_out.get(),
        counters.packets_in.get(),
        counters.invalid.get() + counters.unknown_spi.get(),
        counters.policy.get(),
        counters.too_big.get()
    );
    ExitCode::SUCCESS
}

/// A client of the admin API at `--admin-listen` (over mutual TLS with `--admin-tls-dir`);
/// `None` after saying on stderr why `command` cannot reach it.
async fn admin_client(
    opts: &Options,
    command: &str,
) -> Option<concentrator_proto::admin::gateway_admin_client::GatewayAdminClient<tonic::transport::Channel>> {
    let addr = opts.admin_listen.to_string();
    let connected = match concentrator_gateway::admin::client_tls(opts) {
        Ok(tls) => concentrator_gateway::admin::connect(&addr, tls.as_ref()).await,
        Err(e) => Err(e.to_string()),
    };
    connected
        .map_err(|e| eprintln!("concentrator-gateway {command}: cannot reach the admin API at {addr}: {e}"))
        .ok()
}

/// `tunnels`: the status view of a running gateway.
async fn tunnels(opts: &Options, peer_id_pattern: String, eroute: String, fleet: bool) -> ExitCode {
    use concentrator_proto::admin::ListTunnelsRequest;
    let Some(mut client) = admin_client(opts, "tunnels").await else {
        return ExitCode::FAILURE;
    };
    match client
        .list_tunnels(ListTunnelsRequest {
            peer_id_pattern,
            eroute,
            fleet,
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            print!("{}", concentrator_gateway::tunnels_table(&r.tunnels));
            for u in &r.unreachable {
                eprintln!("concentrator-gateway tunnels: not listed: {u}");
            }
            if r.unreachable.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
        Err(s) => {
            eprintln!(
                "concentrator-gateway tunnels: {}",
                concentrator_gateway::admin::status_text(&s)
            );
            ExitCode::from(2)
        }
    }
}

/// `drain`: asks a running gateway to drain (or to stop draining), and waits if asked.
async fn drain(opts: &Options, cancel: bool, wait: Option<std::time::Duration>, exit: bool) -> ExitCode {
    use concentrator_proto::admin::{DrainRequest, drain_status::State};
    let Some(mut client) = admin_client(opts, "drain").await else {
        return ExitCode::FAILURE;
    };
    let deadline = wait.map(|w| tokio::time::Instant::now() + w);
    loop {
        let r = client
            .drain(DrainRequest {
                cancel,
                exit_when_drained: exit,
            })
            .await;
        let status = match r {
            Ok(r) => r.into_inner(),
            // A gateway asked to exit once drained may be gone before it answers again.
            Err(_) if exit && deadline.is_some() => {
                println!("drained (the gateway exited)");
                return ExitCode::SUCCESS;
            }
            Err(s) => {
                eprintln!(
                    "concentrator-gateway drain: {}",
                    concentrator_gateway::admin::status_text(&s)
                );
                return ExitCode::from(2);
            }
        };
        let state = match status.state() {
            State::Active => "active",
            State::Draining => "draining",
            State::Drained => "drained",
            State::Unspecified => "unknown",
        };
        if status.nowhere_to_go && deadline.is_some() {
            println!("{state}: {} tunnels left", status.remaining_tunnels);
            eprintln!(
                "concentrator-gateway drain: no other member takes tunnels: they end with the gateway (IKE DELETE)"
            );
            return ExitCode::SUCCESS;
        }
        let done = status.state() != State::Draining;
        match deadline {
            Some(d) if !done => {
                if tokio::time::Instant::now() >= d {
                    println!("{state}: {} tunnels left", status.remaining_tunnels);
                    eprintln!("concentrator-gateway drain: not drained in time");
                    return ExitCode::from(4);
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            _ => {
                println!("{state}: {} tunnels left", status.remaining_tunnels);
                return ExitCode::SUCCESS;
            }
        }
    }
}

/// `migrate` and `sites import`: one-shot maintenance of the site store.
async fn maintain(opts: &Options, command: &Command) -> ExitCode {
    if let Command::EspStatic(args) = command {
        return esp_static(args).await;
    }
    if let Command::Drain {
        cancel,
        wait,
        timeout,
        exit,
    } = command
    {
        return drain(opts, *cancel, wait.then_some(*timeout), *exit).await;
    }
    if let Command::Tunnels {
        peer_id,
        eroute,
        fleet,
    } = command
    {
        return tunnels(
            opts,
            peer_id.clone().unwrap_or_default(),
            eroute.clone().unwrap_or_default(),
            *fleet,
        )
        .await;
    }
    let store = match open_site_store(opts).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("concentrator-gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command {
        Command::EspStatic(_) | Command::Tunnels { .. } | Command::Drain { .. } => Ok(String::new()),
        Command::Migrate => store
            .migrate()
            .await
            .map(|()| format!("{} site store migrated", store.kind()))
            .map_err(|e| e.to_string()),
        Command::Sites(SitesCommand::Import { file, prefix }) => {
            // The embedded store is ours to shape (as at start); an external one must have
            // been migrated by its operators (`migrate`).
            let ready = match store {
                concentrator_gateway::sitedb::SiteStore::Sqlite(_) => {
                    store.migrate().await.map_err(|e| e.to_string())
                }
                concentrator_gateway::sitedb::SiteStore::MySql(_) => Ok(()),
            };
            match ready {
                Err(e) => Err(e),
                Ok(()) => concentrator_gateway::sites::import(&store, file, *prefix)
                    .await
                    .map(|n| format!("imported {n} site(s) from {}", file.display()))
                    .map_err(|e| e.to_string()),
            }
        }
    };
    store.close().await;
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("concentrator-gateway: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(opts: Options) -> ExitCode {
    if let Some(command) = &opts.command {
        return maintain(&opts, command).await;
    }
    let Some(config_dir) = opts.config_dir.clone() else {
        eprintln!("concentrator-gateway: --config-dir (or CONCENTRATOR_CONFIG_DIR) is required");
        return ExitCode::from(2);
    };
    // Config errors are the common failure: report them plainly, before any log set-up.
    let config = match config::load_dir(&config_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("concentrator-gateway: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if opts.check {
        for line in summary(&config) {
            println!("{line}");
        }
        if !check_site_tables(&opts, &config).await {
            return ExitCode::from(2);
        }
        println!("configuration in {} is valid", config_dir.display());
        return ExitCode::SUCCESS;
    }
    let _telemetry = match concentrator_telemetry::init("concentrator-gateway", opts.log_format) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("concentrator-gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    for line in summary(&config) {
        tracing::info!("{line}");
    }
    if config.set.eroutes.is_empty() {
        tracing::warn!(dir = %config_dir.display(), "no Eroute configured: no tunnel will be accepted");
    }
    let stop = StopSignals::register();
    let running = match start(&opts, config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        admin = %running.admin_addr,
        metrics = %running.metrics_addr,
        site_store = running.site_store.kind(),
        "gateway ready"
    );
    let gateway = running.gateway.clone();
    tokio::select! {
        () = stop.wait() => tracing::info!("stop signal: shutting down"),
        () = gateway.stop_requested() => tracing::info!("drained: shutting down as asked"),
    }
    running.stop(opts.drain_timeout).await;
    ExitCode::SUCCESS
}

/// `--check`: each egroup's site table against its Egroup, where the database answers (a
/// database that is down now is no configuration error). False if a table does not fit.
async fn check_site_tables(opts: &Options, config: &config::Config) -> bool {
    use concentrator_crds::egroup::DatabaseLocation;
    use concentrator_gateway::egroups::store_of;
    use concentrator_gateway::sitedb::{EMBEDDED_FILE, LookupError, SiteLookups};
    // `--check` creates nothing: a SQLite store that does not exist yet has no table (a
    // start would create and migrate it).
    let default = match opts.site_db.as_deref() {
        Some(url) if sqlite_file_missing(url) => None,
        Some(_) => open_site_store(opts).await.ok(),
        None if opts.data_dir.join(EMBEDDED_FILE).exists() => open_site_store(opts).await.ok(),
        None => None,
    };
    let mut fits = true;
    for (name, spec) in &config.set.egroups {
        let url = match &spec.database {
            DatabaseLocation::Url(u) => Some(u.expose().to_owned()),
            DatabaseLocation::Secret(_) => config
                .egroup_db_urls
                .get(name)
                .map(|u| String::from_utf8_lossy(u.expose()).trim().to_owned()),
            DatabaseLocation::Embedded => None,
        };
        if url.as_deref().is_some_and(sqlite_file_missing) {
            println!("egroup {name}: site table not checked: the site store does not exist yet");
            continue;
        }
        let store = match store_of(config, name, spec, default.as_ref()).await {
            Ok(Some(store)) => store,
            Ok(None) => {
                println!("egroup {name}: site table not checked: the site store does not exist yet");
                continue;
            }
            Err(e) => {
                println!("egroup {name}: site table not checked: {e}");
                continue;
            }
        };
        let lookups = SiteLookups::new(name, store, spec.site_table.clone(), spec.timeout);
        match lookups.check_schema().await {
            Ok(()) => println!("egroup {name}: site table '{}' fits", spec.site_table.table),
            Err(e @ LookupError::Schema { .. }) => {
                eprintln!("concentrator-gateway: invalid configuration: egroup {name}: {e}");
                fits = false;
            }
            Err(e) => println!("egroup {name}: site table not checked: {e}"),
        }
    }
    fits
}

/// Whether `url` names a SQLite file that does not exist (opening it would create it).
fn sqlite_file_missing(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return false;
    };
    let path = rest
        .trim_start_matches("//")
        .split('?')
        .next()
        .unwrap_or_default();
    !path.is_empty() && path != ":memory:" && !std::path::Path::new(path).exists()
}

/// Stop signals, registered before the gateway says it is ready: a SIGTERM that arrives right
/// after "gateway ready" must shut down cleanly, not kill the process.
struct StopSignals {
    term: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn register() -> Self {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only"))
            .ok();
        Self { term }
    }

    async fn wait(mut self) {
        let ctrl_c = tokio::signal::ctrl_c();
        match self.term.as_mut() {
            Some(term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            None => {
                let _ = ctrl_c.await;
            }
        }
    }
}
