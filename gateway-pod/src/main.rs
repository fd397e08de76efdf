use std::process::ExitCode;

use clap::Parser;
use concentrator_gateway::{Options, config, start, summary};

fn main() -> ExitCode {
    let opts = Options::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("concentrator-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(opts))
}

async fn run(opts: Options) -> ExitCode {
    // Config errors are the common failure: report them plainly, before any log set-up.
    let config = match config::load_dir(&opts.config_dir) {
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
        println!("configuration in {} is valid", opts.config_dir.display());
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
        tracing::warn!(dir = %opts.config_dir.display(), "no Eroute configured: no tunnel will be accepted");
    }
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
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
