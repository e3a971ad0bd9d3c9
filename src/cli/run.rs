//! `payload-guard run`: load the configuration, bind the listeners, serve until SIGTERM/SIGINT.

use std::path::Path;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::proxy::Proxy;
use crate::server;

use super::{EXIT_ERROR, EXIT_OK, EXIT_USAGE};

/// Runs the proxy until a shutdown signal.
pub(super) fn run(path: &Path) -> u8 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{err}");
            return EXIT_USAGE;
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = config.server.worker_threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return EXIT_ERROR;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => EXIT_OK,
        Err(err) => {
            eprintln!("payload-guard: {err:#}");
            EXIT_ERROR
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.server.listen;
    let admin_listen = config.server.admin_listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen)"))?;
    let proxy = Proxy::start(config).context("cannot set up the routes")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = admin_listen {
        let admin = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (server.admin_listen)"))?;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _ = server::serve_admin(admin, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        });
    }
    let result = server::serve(listener, proxy, server::shutdown_signal()).await;
    let _ = stop_tx.send(true);
    result.context("server failed")
}
