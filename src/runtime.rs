//! What a running proxy serves with: the [`Runtime`] built from one configuration (the route
//! table and each route's upstream client; replaced whole on reload) and the [`Shared`] state
//! that outlives reloads (buffer budget, incident log, learned limits, dedupe memory, metrics,
//! the spool). The request pipeline ([`crate::proxy`]) and delivery ([`crate::deliver`]) both
//! use them; neither owns them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::buffer::{BodySlots, BufferBudget};
use crate::config::Config;
use crate::error::ProxyError;
use crate::forward::{self, UpstreamClient};
use crate::incident::{Incident, IncidentLog};
use crate::metrics::Metrics;
use crate::route::RouteTable;
use crate::spool::state::SpoolState;
use crate::state::{DedupeMemory, LearnedLimits, Persisted, dedupe, limits};

/// Default capacity of the incident queue.
pub const INCIDENT_QUEUE: usize = 1024;

/// One route, ready to serve: its configuration and its pooled upstream client (used for HTTPS
/// receivers, HTTP/2 senders and redelivery; see [`crate::forward::ConnUpstream`] for the rest).
pub struct RouteRuntime {
    /// The route's configuration.
    pub config: crate::config::RouteConfig,
    client: UpstreamClient,
    upstream_host: Option<http::HeaderValue>,
}

impl RouteRuntime {
    /// The route's pooled upstream client.
    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// The `Host` the receiver gets in place of the sender's, for a plain-HTTP upstream
    /// (see [`forward::ForwardedFor::upstream_host`]); made once, not per request.
    pub fn upstream_host(&self) -> Option<&http::HeaderValue> {
        self.upstream_host.as_ref()
    }
}

/// Everything a request needs, built from one [`Config`]; replaced whole on reload.
pub struct Runtime {
    /// The configuration this runtime was built from.
    pub config: Arc<Config>,
    pub(crate) table: RouteTable,
    pub(crate) routes: Vec<RouteRuntime>,
}

impl Runtime {
    /// Builds the route table and one upstream client per route.
    pub fn new(config: Config) -> Result<Runtime, ProxyError> {
        let table = RouteTable::new(config.routes.iter().map(|r| r.path_prefix.as_str()));
        let routes = config
            .routes
            .iter()
            .map(|r| {
                Ok(RouteRuntime {
                    config: r.clone(),
                    client: forward::build_client(r)?,
                    upstream_host: forward::plain_http_host(&r.upstream),
                })
            })
            .collect::<Result<Vec<_>, ProxyError>>()?;
        Ok(Runtime {
            config: Arc::new(config),
            table,
            routes,
        })
    }

    /// The route with this name.
    pub fn route_by_name(&self, name: &str) -> Option<&RouteRuntime> {
        self.routes.iter().find(|r| r.config.name == name)
    }
}

/// Large bodies held in memory at once, per worker thread: the trim of one body is work a
/// thread does alone, so more only add memory (benches/load: 8 senders of 5 MiB at once).
const BODY_SLOTS_PER_WORKER: usize = 1;

/// The slots of [`Shared::slots`]: [`BODY_SLOTS_PER_WORKER`] per worker thread.
fn body_slots(config: &Config) -> usize {
    let workers = config.server.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    workers * BODY_SLOTS_PER_WORKER
}

/// State that outlives a configuration reload: the buffer budget, the incident log, what was
/// learned about receivers' limits, the dedupe memory and the spool.
pub struct Shared {
    /// Memory all buffered bodies share.
    pub budget: Arc<BufferBudget>,
    /// How many large bodies are read and trimmed in memory at once: one per worker thread.
    pub slots: Arc<BodySlots>,
    /// The incident log.
    pub incidents: IncidentLog,
    /// Learned receiver limits, per route.
    pub learned: Arc<LearnedLimits>,
    /// Delivered payload ids, for routes with `dedupe`.
    pub dedupe: Arc<DedupeMemory>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Connections open right now (public listener).
    pub open_connections: Arc<AtomicU64>,
    /// The spool, when a route uses it.
    pub spool: Option<SpoolState>,
}

impl Shared {
    /// Budget from `[server] buffer_budget`, the incident log at `[incidents] path` (its writer
    /// task starts on the current tokio runtime), the learned limits and dedupe memory from
    /// their state files (see [`crate::state`]), and the spool when a route uses it.
    pub fn for_config(config: &Config) -> Result<Shared, ProxyError> {
        let spool = if config.spool.used {
            Some(SpoolState::open(&config.spool).map_err(|e| {
                ProxyError::Internal(format!(
                    "cannot open the spool at {}: {e}",
                    config.spool.dir.display()
                ))
            })?)
        } else {
            None
        };
        let metrics = Metrics::new();
        for route in &config.routes {
            metrics.init_route(&route.name);
        }
        let learned = Arc::new(LearnedLimits::open(crate::state::limits_path(config)));
        learned.reconcile(config.routes.iter().map(|r| limits::Configured {
            route: &r.name,
            upstream_limit: r.upstream_limit_bytes,
        }));
        learned.spawn_writer();
        let dedupe = Arc::new(DedupeMemory::open(
            crate::state::dedupe_path(config),
            dedupe::DEFAULT_CAPACITY,
        ));
        dedupe.spawn_writer();
        if let crate::config::StoreBackend::Postgres { url_env } = &config.spool.backend {
            let db = crate::db::Database::from_env(url_env, 2)
                .map_err(|e| ProxyError::Internal(format!("[spool] backend: {e}")))?;
            crate::state::shared::spawn(db, learned.clone(), dedupe.clone());
        }
        let mut incidents = IncidentLog::start(config.incidents.path.clone(), INCIDENT_QUEUE);
        if let crate::config::StoreBackend::Postgres { url_env } = &config.incidents.backend {
            let db = crate::db::Database::from_env(url_env, 2)
                .map_err(|e| ProxyError::Internal(format!("[incidents] backend: {e}")))?;
            incidents = incidents.with_table(crate::incident::table::IncidentTable::start(db));
        }
        Ok(Shared {
            budget: BufferBudget::new(config.server.buffer_budget_bytes),
            slots: BodySlots::new(body_slots(config)),
            incidents,
            learned,
            dedupe,
            metrics,
            open_connections: Arc::new(AtomicU64::new(0)),
            spool,
        })
    }

    /// The values the metrics endpoint reads at scrape time.
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        crate::metrics::Snapshot {
            incidents_dropped: self.incidents.dropped(),
            buffer_in_use_bytes: self.budget.in_use(),
            buffer_budget_bytes: self.budget.limit(),
            open_connections: self.open_connections.load(Ordering::Relaxed),
            resident_bytes: crate::metrics::resident_bytes(),
            spool_depth: self.spool.as_ref().map_or_else(Vec::new, |s| {
                crate::spool::State::ALL
                    .iter()
                    .map(|state| (state.as_str().to_string(), s.spool.depth(*state) as u64))
                    .collect()
            }),
            spool_routes: self.spool.as_ref().map_or_else(Vec::new, |s| {
                crate::metrics::spool_route_readings(&s.spool, std::time::SystemTime::now())
            }),
        }
    }

    /// Writes the state files now (at shutdown; blocking I/O).
    pub fn flush_state(&self) {
        if let Err(err) = self.learned.flush() {
            tracing::error!(error = %err, "cannot write the learned limits file");
        }
        if let Err(err) = self.dedupe.flush() {
            tracing::error!(error = %err, "cannot write the dedupe file");
        }
    }
}

/// Records an incident: counted in the metrics, written to the log, and said once in the
/// proxy's own log (WARN; INFO for a payload that was trimmed and delivered).
pub fn record_incident(shared: &Shared, incident: Incident) {
    shared.services().record(incident);
}
