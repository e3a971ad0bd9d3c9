//! `payload-guard replay`: send spooled payloads now, the same way the redelivery task does
//! (route trim rules applied, `Idempotency-Key` set, deleted only after a 2xx), with progress
//! on stderr and a summary at the end; exit 1 if any failed.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use http::Uri;

use crate::config::Config;
use crate::deliver::{self, Services, SpoolState};
use crate::incident::IncidentLog;
use crate::judge::Verdict;
use crate::metrics::Metrics;
use crate::proxy::Runtime;
use crate::spool::{RecordId, State};
use crate::state::{LearnedLimits, Persisted};

use super::{EXIT_OK, EXIT_PROBLEMS, EXIT_SOFTWARE, EXIT_UNAVAILABLE, EXIT_USAGE, emit};

/// What to replay.
pub(super) struct Selection<'a> {
    pub(super) route: Option<&'a str>,
    pub(super) state: State,
    pub(super) id: Option<&'a str>,
    pub(super) dry_run: bool,
    pub(super) to: Option<&'a str>,
}

/// Replays the selected records.
pub(super) fn replay(config: &Path, sel: Selection<'_>) -> u8 {
    let config = match Config::load(config) {
        Ok(config) => config,
        Err(err) => return super::config_failed(&err),
    };
    if sel.state == State::Archive {
        eprintln!(
            "payload-guard replay: --state must be ready or dead (archived originals were already delivered, trimmed)"
        );
        return EXIT_USAGE;
    }
    let to: Option<Uri> = match sel.to.map(str::parse::<Uri>) {
        None => None,
        Some(Ok(uri)) if uri.scheme().is_some() && uri.authority().is_some() => Some(uri),
        Some(_) => {
            eprintln!(
                "payload-guard replay: --to must be an http(s) URL like http://127.0.0.1:3000/webhook"
            );
            return EXIT_USAGE;
        }
    };
    let spool = match crate::spool::store::open(&config.spool, false) {
        Ok(spool) => spool,
        Err(err) => {
            eprintln!("payload-guard replay: {err}");
            return EXIT_UNAVAILABLE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("payload-guard replay: cannot start the async runtime: {err}");
            return EXIT_SOFTWARE;
        }
    };
    let mut ids: Vec<RecordId> = match sel.id {
        Some(id) => match id.parse() {
            Ok(id) => vec![id],
            Err(err) => {
                eprintln!("payload-guard replay: {err}");
                return EXIT_USAGE;
            }
        },
        None => match runtime.block_on(spool.list(sel.state, sel.route)) {
            Ok(entries) => entries.into_iter().map(|e| e.id).collect(),
            Err(err) => {
                eprintln!("payload-guard replay: {err}");
                return EXIT_UNAVAILABLE;
            }
        },
    };
    ids.dedup();
    if ids.is_empty() {
        emit(&format!(
            "nothing to replay: no {} records match\n",
            sel.state
        ));
        return EXIT_OK;
    }
    if sel.dry_run {
        for id in &ids {
            if let Ok(Some(entry)) = runtime.block_on(spool.find(id)) {
                emit(&format!(
                    "would send {id} ({}, {} bytes, {} attempts) to {}\n",
                    entry.meta.route,
                    entry.body_len,
                    entry.meta.attempts,
                    to.as_ref()
                        .map_or_else(|| format!("route {}", entry.meta.route), |u| u.to_string())
                ));
            }
        }
        return EXIT_OK;
    }
    let learned = Arc::new(LearnedLimits::open(crate::state::limits_path(&config)));
    let metrics = Metrics::new();
    let state = SpoolState::attached(spool.clone(), &config.spool);
    let incidents_path = config.incidents.path.clone();
    let proxy_runtime = match Runtime::new(config) {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("payload-guard replay: {err}");
            return EXIT_UNAVAILABLE;
        }
    };
    let total = ids.len();
    let (mut delivered, mut failed) = (0usize, 0usize);
    runtime.block_on(async {
        let incidents = IncidentLog::start(incidents_path, crate::proxy::INCIDENT_QUEUE);
        let services = Services {
            learned: &learned,
            metrics: &metrics,
            incidents: Some(&incidents),
            spool: Some(&state),
        };
        for (i, id) in ids.iter().enumerate() {
            if sel.state == State::Dead && !spool.revive(id).await.unwrap_or(false) {
                // Not in dead/ (maybe it is ready): claim it where it is.
            }
            let claimed = match spool.claim(id).await {
                Ok(Some(mut claim)) => claim.body().await.map(|body| Some((claim, body))),
                Ok(None) => Ok(None),
                Err(err) => Err(err),
            };
            let (claim, body) = match claimed {
                Ok(Some(pair)) => pair,
                Ok(None) => {
                    eprintln!(
                        "{id}: skipped (not ready, or being delivered by the proxy right now)"
                    );
                    failed += 1;
                    continue;
                }
                Err(err) => {
                    eprintln!("{id}: {err}");
                    failed += 1;
                    continue;
                }
            };
            let meta = claim.meta().clone();
            let attempt =
                deliver::attempt(&proxy_runtime, services, &meta, body.into(), to.as_ref()).await;
            let now = SystemTime::now();
            let settled = deliver::settle(claim, &attempt, &state, now, i as u64).await;
            let outcome = match (&attempt.verdict, settled) {
                (Verdict::Delivered, _) => {
                    delivered += 1;
                    format!("delivered ({})", attempt.status.unwrap_or(0))
                }
                (Verdict::Final(status), _) => {
                    failed += 1;
                    format!("refused for good: {status} (moved to dead/)")
                }
                (_, deliver::Settled::Buried) => {
                    failed += 1;
                    format!(
                        "refused for good: {} (moved to dead/)",
                        attempt.status.map_or_else(|| "no answer".into(), |s| s.to_string())
                    )
                }
                (Verdict::TooLarge { .. }, _) => {
                    failed += 1;
                    "refused as too large, trimmed as low as the retries allow (kept for redelivery)".to_string()
                }
                (Verdict::Retryable(why), _) => {
                    failed += 1;
                    format!("failed: {why} (kept for redelivery)")
                }
            };
            if total > 5 {
                eprint!(
                    "\r[{}/{total}] {delivered} delivered, {failed} failed",
                    i + 1
                );
                let _ = std::io::stderr().flush();
            } else {
                eprintln!("{id} ({}): {outcome}", meta.route);
            }
        }
        incidents.flush().await;
    });
    if total > 5 {
        eprintln!();
    }
    if let Err(err) = learned.flush() {
        eprintln!("payload-guard replay: cannot write the learned limits: {err}");
    }
    emit(&format!(
        "replayed {total}: {delivered} delivered, {failed} failed\n"
    ));
    if failed > 0 { EXIT_PROBLEMS } else { EXIT_OK }
}
