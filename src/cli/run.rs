//! `payload-guard run`: load the configuration, bind the listeners, serve until SIGTERM/SIGINT.

use std::path::Path;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Config;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::admin::{Admin, reload, serve_admin};
use crate::proxy::Proxy;
use crate::server;

use super::{EXIT_OK, EXIT_SOFTWARE, EXIT_UNAVAILABLE};

/// Runs the proxy until a shutdown signal.
pub(super) fn run(path: &Path) -> u8 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(err) => return super::config_failed(&err),
    };
    // One worker: tokio's current-thread scheduler does the same work without the
    // multi-thread scheduler's cross-thread queues and wake-ups (3-4 µs less per request in
    // benches/load).
    let mut builder = match config.server.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(threads) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("payload-guard: cannot start the async runtime: {err}");
            return EXIT_SOFTWARE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => EXIT_OK,
        Err(err) => {
            eprintln!("payload-guard: {err:#}");
            EXIT_UNAVAILABLE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let config_path = config.source.clone();
    let listen = config.server.listen;
    let admin_listen = config.server.admin_listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen)"))?;
    let admin_listener = match admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (server.admin_listen)"))?,
        ),
        None => None,
    };
    let proxy = Proxy::start(config).context("cannot set up the routes")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(admin_listener) = admin_listener {
        let admin = Admin {
            proxy: proxy.clone(),
            config_path: config_path.clone(),
            ready: ready.clone(),
        };
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _ = serve_admin(admin_listener, admin, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        });
    }
    spawn_reload_on_sighup(proxy.clone(), config_path);
    if let Some(state) = proxy.shared().spool.clone() {
        if let Err(err) = state.spool.prepare().await {
            // Not fatal: spool routes answer 503 and /readyz says so until it is reachable.
            tracing::error!(spool = %state.spool.location(), error = %err, "spool not ready yet; retrying on every use");
        }
        let current = proxy.clone();
        crate::deliver::spawn_redelivery(move || current.current(), proxy.shared_arc(), state);
    }
    ready.store(true, Ordering::Release);
    let result = server::serve(listener, proxy.clone(), server::shutdown_signal()).await;
    let _ = stop_tx.send(true);
    // Everything queued for the incident log is written before exit.
    proxy.shared().incidents.flush().await;
    let shared = proxy.shared_arc();
    let _ = tokio::task::spawn_blocking(move || shared.flush_state()).await;
    result.context("server failed")
}

/// SIGHUP re-reads the configuration (as `POST /reload` on the admin listener does).
fn spawn_reload_on_sighup(proxy: Proxy, path: std::path::PathBuf) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP: reload with POST /reload instead");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the configuration");
            let _ = reload(&proxy, &path);
        }
    });
    #[cfg(not(unix))]
    let _ = (proxy, path);
}
