//! Stage 1, under pressure: which connections are let in, and which are shed. Connections
//! beyond the cap never wait in the kernel's accept queue (one slow client would stall every
//! sender): a new connection is admitted, makes room by evicting the worst open connection, or
//! is answered at once with `503`.
//!
//! - `max_connections_per_ip` caps each client address (IPv6 counted per /64): one more gets
//!   `503` at once.
//! - At `max_connections`, the open connection furthest behind `body_min_rate` (more than a
//!   second's worth of bytes behind) is evicted with `408`; else the one whose request head is
//!   slowest; else the one idle longest between requests (a plain close). Only when every open
//!   connection is busy and healthy is the new one answered with `503`.
//! - Under pressure (open connections above [`PRESSURE_PERCENT`] of the cap) the header and
//!   body idle timeouts shrink to a fifth (at least a second), and a body slower than
//!   `body_min_rate` after its first [`MIN_RATE_GRACE`] gets `408`.
//!
//! The choice of a victim is a pure function over [`ConnView`]s ([`pick_victim`]); the table
//! of open connections ([`Admission`]) and the per-connection tracker ([`ConnTrack`]) feed it.
//! Request bodies report their progress through [`BodyProgress`], which [`crate::limit`]
//! registers with the connection the request arrived on (`proxy::ConnInfo::track`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Above this share of `max_connections` (in percent), the proxy is under pressure.
pub const PRESSURE_PERCENT: usize = 80;
/// Under pressure, header and body idle timeouts are divided by this...
pub const PRESSURE_TIMEOUT_DIVISOR: u32 = 5;
/// ...but never below this.
pub const PRESSURE_TIMEOUT_FLOOR: Duration = Duration::from_secs(1);
/// A body's first seconds are not held to `body_min_rate` under pressure.
pub const MIN_RATE_GRACE: Duration = Duration::from_secs(5);
/// To be evicted for slowness, a body (or a request head) must be this far behind.
pub const EVICT_BEHIND: Duration = Duration::from_secs(1);
/// An evicted connection that has not closed by then is closed without an answer.
pub const EVICT_GRACE: Duration = Duration::from_secs(2);

/// The client key connections are counted under: the address, IPv6 per /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    /// The key of `ip` (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(_) => ClientKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    ClientKey(IpAddr::V6(bits.into()))
                }
            },
        }
    }
}

/// Why a connection was shed (the `reason` label of `payload_guard_connections_shed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedReason {
    /// A new connection over `max_connections_per_ip`: `503`.
    PerIpLimit,
    /// A new connection at `max_connections` with every open connection healthy: `503`.
    OverCapacity,
    /// Evicted at the cap: its body was furthest behind `body_min_rate` (`408`).
    EvictSlowBody,
    /// Evicted at the cap: its request head was the slowest (closed).
    EvictSlowHead,
    /// Evicted at the cap: idle longest between requests (closed).
    EvictIdle,
    /// Under pressure: a body slower than `body_min_rate` (`408`).
    BelowMinRate,
    /// Under pressure: past a shrunk header, body or keep-alive idle timeout.
    PressureTimeout,
}

impl ShedReason {
    /// Every reason, for zero-valued series.
    pub const ALL: [ShedReason; 7] = [
        ShedReason::PerIpLimit,
        ShedReason::OverCapacity,
        ShedReason::EvictSlowBody,
        ShedReason::EvictSlowHead,
        ShedReason::EvictIdle,
        ShedReason::BelowMinRate,
        ShedReason::PressureTimeout,
    ];

    /// Stable label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::PerIpLimit => "per_ip_limit",
            ShedReason::OverCapacity => "over_capacity",
            ShedReason::EvictSlowBody => "evict_slow_body",
            ShedReason::EvictSlowHead => "evict_slow_head",
            ShedReason::EvictIdle => "evict_idle",
            ShedReason::BelowMinRate => "below_min_rate",
            ShedReason::PressureTimeout => "pressure_timeout",
        }
    }
}

/// Why a request body was stopped from outside (read by [`crate::limit::LimitedBody`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKill {
    /// Too slow (eviction or the pressure minimum rate): `408 body_too_slow`.
    TooSlow,
    /// No bytes for the shrunk idle timeout: `408 body_idle_timeout`.
    Idle(Duration),
}

/// The progress of one request body, shared between the body and the shedding logic.
#[derive(Debug)]
pub struct BodyProgress {
    started: Instant,
    bytes: AtomicU64,
    /// Nanoseconds after `started` of the last data.
    last_data_nanos: AtomicU64,
    done: AtomicBool,
    kill: AtomicU8,
    /// The shrunk idle timeout when `kill` says [`BodyKill::Idle`].
    kill_idle_millis: AtomicU64,
    waker: AtomicWaker,
}

const KILL_NONE: u8 = 0;
const KILL_SLOW: u8 = 1;
const KILL_IDLE: u8 = 2;

impl BodyProgress {
    fn new(now: Instant) -> BodyProgress {
        BodyProgress {
            started: now,
            bytes: AtomicU64::new(0),
            last_data_nanos: AtomicU64::new(0),
            done: AtomicBool::new(false),
            kill: AtomicU8::new(KILL_NONE),
            kill_idle_millis: AtomicU64::new(0),
            waker: AtomicWaker::new(),
        }
    }

    /// Notes `total` bytes received so far, at `now`.
    pub fn data(&self, total: u64, now: Instant) {
        self.bytes.store(total, Ordering::Relaxed);
        let nanos = now.saturating_duration_since(self.started).as_nanos() as u64;
        self.last_data_nanos.store(nanos, Ordering::Relaxed);
    }

    /// The body ended (complete or failed): it no longer counts as a body in progress.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }

    /// Whether the body was stopped from outside, and why; registers `waker` to be woken when
    /// it is.
    pub fn killed(&self, waker: &std::task::Waker) -> Option<BodyKill> {
        self.waker.register(waker);
        self.kill_reason()
    }

    fn kill_reason(&self) -> Option<BodyKill> {
        match self.kill.load(Ordering::Acquire) {
            KILL_SLOW => Some(BodyKill::TooSlow),
            KILL_IDLE => Some(BodyKill::Idle(Duration::from_millis(
                self.kill_idle_millis.load(Ordering::Relaxed),
            ))),
            _ => None,
        }
    }

    fn kill(&self, how: BodyKill) {
        if let BodyKill::Idle(d) = how {
            self.kill_idle_millis
                .store(d.as_millis() as u64, Ordering::Relaxed);
        }
        let code = match how {
            BodyKill::TooSlow => KILL_SLOW,
            BodyKill::Idle(_) => KILL_IDLE,
        };
        let _ = self
            .kill
            .compare_exchange(KILL_NONE, code, Ordering::AcqRel, Ordering::Acquire);
        self.waker.wake();
    }
}

/// One open connection as the shedding logic sees it.
#[derive(Debug)]
pub struct ConnTrack {
    id: u64,
    key: ClientKey,
    epoch: Instant,
    /// Requests being served (handler running).
    in_flight: AtomicU32,
    /// Nanoseconds after `epoch` of the last read or write.
    last_io_nanos: AtomicU64,
    /// Nanoseconds after `epoch` when the current request head began (0: not reading one).
    head_since_nanos: AtomicU64,
    bodies: Mutex<Vec<Weak<BodyProgress>>>,
    /// Set when the connection must go; `close` wakes its serving task.
    evicted_nanos: AtomicU64,
    /// The serving task's waker (one task waits: see [`ConnTrack::stopped`]). An `AtomicWaker`,
    /// not a `Notify`: a registered `Notified` takes the notifier's lock each time it is
    /// polled, and the serving task polls this beside its connection several times a request.
    close: AtomicWaker,
    closing: AtomicBool,
    /// Set when the server shuts down: the connection finishes what it is doing and closes.
    draining: AtomicBool,
}

/// Why a connection's serving task must stop serving as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Evicted, or timed out under pressure: close it now.
    Shed,
    /// The server shuts down: let in-flight requests finish, then close.
    Drain,
}

impl ConnTrack {
    fn new(id: u64, key: ClientKey, epoch: Instant) -> ConnTrack {
        let now = nanos_since(epoch, Instant::now());
        ConnTrack {
            id,
            key,
            epoch,
            in_flight: AtomicU32::new(0),
            last_io_nanos: AtomicU64::new(now),
            // A new connection owes its first request head from the start.
            head_since_nanos: AtomicU64::new(now.max(1)),
            bodies: Mutex::new(Vec::new()),
            evicted_nanos: AtomicU64::new(0),
            close: AtomicWaker::new(),
            closing: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    /// Notes bytes read from the sender.
    pub fn on_read(&self) {
        let now = nanos_since(self.epoch, Instant::now()).max(1);
        self.last_io_nanos.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let _ =
                self.head_since_nanos
                    .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// Notes bytes written to the sender.
    pub fn on_write(&self) {
        let now = nanos_since(self.epoch, Instant::now()).max(1);
        self.last_io_nanos.store(now, Ordering::Relaxed);
    }

    /// Whether bytes of a request head arrived that did not become a request (the connection
    /// was inside a head when it closed).
    pub fn inside_head(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.head_since_nanos.load(Ordering::Acquire) != 0
    }

    /// A request reached the handler; the guard marks it done when dropped.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since_nanos.store(0, Ordering::Release);
        InFlight(self.clone())
    }

    /// Registers a request body, begun at `started`, whose progress the shedding logic watches.
    pub fn body_started(&self, started: Instant) -> Arc<BodyProgress> {
        let progress = Arc::new(BodyProgress::new(started));
        if let Ok(mut bodies) = self.bodies.lock() {
            bodies.retain(|b| b.upgrade().is_some_and(|b| !b.done.load(Ordering::Acquire)));
            bodies.push(Arc::downgrade(&progress));
        }
        progress
    }

    /// Resolves when the connection must stop serving as before: [`Stop::Shed`] when it must
    /// close now, [`Stop::Drain`] (unless `drained`: the caller has acted on it already) when
    /// the server shuts down.
    ///
    /// The connection's serving task waits on this beside the connection itself, so one wait
    /// serves both shedding and shutdown (a graceful-shutdown watch of its own, polled with
    /// the connection, cost about 660 instructions a request).
    ///
    /// One task at a time may wait on it (the connection's serving task).
    pub fn stopped(&self, drained: bool) -> impl Future<Output = Stop> + '_ {
        std::future::poll_fn(move |cx| {
            // Registered before the flags are read: a flag set after this reading wakes the
            // waker registered here.
            self.close.register(cx.waker());
            if self.closing.load(Ordering::Acquire) {
                Poll::Ready(Stop::Shed)
            } else if !drained && self.draining.load(Ordering::Acquire) {
                Poll::Ready(Stop::Drain)
            } else {
                Poll::Pending
            }
        })
    }

    fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.close.wake();
    }

    fn close_now(&self) {
        self.closing.store(true, Ordering::Release);
        self.close.wake();
    }

    /// Stops its bodies with `how` (they answer `408`), or closes it when it has none.
    fn evict(&self, how: BodyKill, now: Instant) -> bool {
        let bodies = self.live_bodies();
        let _ = self.evicted_nanos.compare_exchange(
            0,
            nanos_since(self.epoch, now).max(1),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        if bodies.is_empty() {
            self.close_now();
            return false;
        }
        for body in bodies {
            body.kill(how);
        }
        true
    }

    /// The bytes of each body in progress, for tests.
    #[cfg(test)]
    pub(crate) fn body_bytes(&self) -> Vec<u64> {
        self.live_bodies()
            .iter()
            .map(|b| b.bytes.load(Ordering::Relaxed))
            .collect()
    }

    fn live_bodies(&self) -> Vec<Arc<BodyProgress>> {
        self.bodies.lock().map_or_else(
            |_| Vec::new(),
            |bodies| {
                bodies
                    .iter()
                    .filter_map(Weak::upgrade)
                    .filter(|b| !b.done.load(Ordering::Acquire))
                    .collect()
            },
        )
    }

    fn is_leaving(&self) -> bool {
        self.evicted_nanos.load(Ordering::Acquire) != 0 || self.closing.load(Ordering::Acquire)
    }

    /// What the connection is doing at `now`.
    fn view(&self, now: Instant) -> ConnView {
        let at = |nanos: u64| self.epoch + Duration::from_nanos(nanos);
        let state = if self.in_flight.load(Ordering::Acquire) > 0 {
            let bodies = self.live_bodies();
            match bodies.iter().min_by_key(|b| b.started) {
                Some(first) => ConnState::Body {
                    age: now.saturating_duration_since(first.started),
                    bytes: bodies.iter().map(|b| b.bytes.load(Ordering::Relaxed)).sum(),
                    since_data: now.saturating_duration_since(
                        first.started
                            + Duration::from_nanos(first.last_data_nanos.load(Ordering::Relaxed)),
                    ),
                },
                None => ConnState::Busy,
            }
        } else {
            match self.head_since_nanos.load(Ordering::Acquire) {
                0 => ConnState::Idle {
                    for_: now
                        .saturating_duration_since(at(self.last_io_nanos.load(Ordering::Relaxed))),
                },
                since => ConnState::Head {
                    age: now.saturating_duration_since(at(since)),
                },
            }
        };
        ConnView { id: self.id, state }
    }
}

/// Marks a request done when dropped (see [`ConnTrack::request_started`]).
#[derive(Debug)]
pub struct InFlight(Arc<ConnTrack>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.on_write();
    }
}

/// What a connection is doing, for [`pick_victim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Between requests, for this long.
    Idle {
        /// Time since the last byte in either direction.
        for_: Duration,
    },
    /// Reading a request head that began this long ago.
    Head {
        /// Time since the head's first byte.
        age: Duration,
    },
    /// Receiving a request body.
    Body {
        /// Time since the body began.
        age: Duration,
        /// Bytes received.
        bytes: u64,
        /// Time since the last body bytes.
        since_data: Duration,
    },
    /// Serving a request whose body is complete (waiting for, or relaying, the receiver).
    Busy,
}

/// A connection and its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnView {
    /// The connection's id in the table.
    pub id: u64,
    /// What it is doing.
    pub state: ConnState,
}

/// How many bytes a body of `age` is behind `min_rate`, beyond the one-second allowance
/// ([`EVICT_BEHIND`]); 0 when it keeps up.
pub fn bytes_behind(age: Duration, bytes: u64, min_rate: u64) -> u64 {
    let due = (age.saturating_sub(EVICT_BEHIND).as_secs_f64() * min_rate as f64) as u64;
    due.saturating_sub(bytes)
}

/// The connection to evict to make room for a new one (pure): the body furthest behind
/// `min_rate`, else the slowest request head (older than [`EVICT_BEHIND`]), else the
/// connection idle longest. `None`: every connection is busy and healthy.
pub fn pick_victim(conns: &[ConnView], min_rate: u64) -> Option<(u64, ShedReason)> {
    let slow_body = conns
        .iter()
        .filter_map(|c| match c.state {
            ConnState::Body { age, bytes, .. } => {
                let behind = bytes_behind(age, bytes, min_rate);
                (behind > 0).then_some((behind, c.id))
            }
            _ => None,
        })
        .max();
    if let Some((_, id)) = slow_body {
        return Some((id, ShedReason::EvictSlowBody));
    }
    let slow_head = conns
        .iter()
        .filter_map(|c| match c.state {
            ConnState::Head { age } if age >= EVICT_BEHIND => Some((age, c.id)),
            _ => None,
        })
        .max();
    if let Some((_, id)) = slow_head {
        return Some((id, ShedReason::EvictSlowHead));
    }
    conns
        .iter()
        .filter_map(|c| match c.state {
            ConnState::Idle { for_ } => Some((for_, c.id)),
            _ => None,
        })
        .max()
        .map(|(_, id)| (id, ShedReason::EvictIdle))
}

/// What pressure does to one connection (pure): `None` leaves it alone.
pub fn under_pressure(
    state: ConnState,
    limits: &PressureLimits,
) -> Option<(ShedReason, Option<BodyKill>)> {
    match state {
        ConnState::Idle { for_ } if for_ >= limits.idle => {
            Some((ShedReason::PressureTimeout, None))
        }
        ConnState::Head { age } if age >= limits.header => {
            Some((ShedReason::PressureTimeout, None))
        }
        ConnState::Body {
            age,
            bytes,
            since_data,
        } => {
            if since_data >= limits.body_idle {
                Some((
                    ShedReason::PressureTimeout,
                    Some(BodyKill::Idle(limits.body_idle)),
                ))
            } else if age >= MIN_RATE_GRACE
                && (bytes as f64) < age.as_secs_f64() * limits.min_rate as f64
            {
                Some((ShedReason::BelowMinRate, Some(BodyKill::TooSlow)))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The shrunk timeouts and the minimum rate that apply under pressure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PressureLimits {
    /// Request head timeout.
    pub header: Duration,
    /// Keep-alive idle timeout.
    pub idle: Duration,
    /// Body idle timeout.
    pub body_idle: Duration,
    /// `body_min_rate`, bytes per second.
    pub min_rate: u64,
}

impl PressureLimits {
    /// The limits under pressure for the configured timeouts.
    pub fn new(header_read_timeout: Duration, body_idle_timeout: Duration, min_rate: u64) -> Self {
        let shrink = |d: Duration| (d / PRESSURE_TIMEOUT_DIVISOR).max(PRESSURE_TIMEOUT_FLOOR);
        PressureLimits {
            header: shrink(header_read_timeout),
            idle: shrink(header_read_timeout),
            body_idle: shrink(body_idle_timeout),
            min_rate,
        }
    }
}

/// Why a new connection is not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its address has `max_connections_per_ip` open.
    PerIp,
    /// The cap is reached and no open connection may be evicted.
    Full,
}

impl Refused {
    /// The shed reason counted for it.
    pub fn reason(self) -> ShedReason {
        match self {
            Refused::PerIp => ShedReason::PerIpLimit,
            Refused::Full => ShedReason::OverCapacity,
        }
    }
}

/// The table of open connections of one listener.
#[derive(Debug)]
pub struct Admission {
    epoch: Instant,
    max_connections: AtomicUsize,
    max_per_ip: AtomicUsize,
    min_rate: AtomicU64,
    table: Mutex<Table>,
    /// Woken when the last connection leaves the table.
    emptied: Notify,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    conns: HashMap<u64, Arc<ConnTrack>>,
    per_client: HashMap<ClientKey, usize>,
}

/// An admitted connection; leaves the table when dropped.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    /// The connection's tracker.
    pub track: Arc<ConnTrack>,
    /// Whether a connection was evicted to make room, and why.
    pub evicted: Option<ShedReason>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut table) = self.admission.table.lock() {
            table.conns.remove(&self.track.id);
            if let Some(n) = table.per_client.get_mut(&self.track.key) {
                *n -= 1;
                if *n == 0 {
                    table.per_client.remove(&self.track.key);
                }
            }
            if table.conns.is_empty() {
                self.admission.emptied.notify_waiters();
            }
        }
    }
}

impl Admission {
    /// A table for `max_connections` connections, `max_per_ip` per client, bodies held to
    /// `min_rate` bytes/s under pressure.
    pub fn new(max_connections: usize, max_per_ip: usize, min_rate: u64) -> Arc<Admission> {
        Arc::new(Admission {
            epoch: Instant::now(),
            max_connections: AtomicUsize::new(max_connections.max(1)),
            max_per_ip: AtomicUsize::new(max_per_ip.max(1)),
            min_rate: AtomicU64::new(min_rate.max(1)),
            table: Mutex::new(Table::default()),
            emptied: Notify::new(),
        })
    }

    /// Applies new limits (a reload).
    pub fn set_limits(&self, max_connections: usize, max_per_ip: usize, min_rate: u64) {
        self.max_connections
            .store(max_connections.max(1), Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip.max(1), Ordering::Relaxed);
        self.min_rate.store(min_rate.max(1), Ordering::Relaxed);
    }

    /// Connections in the table.
    pub fn open(&self) -> usize {
        self.table.lock().map_or(0, |t| t.conns.len())
    }

    /// Tells every open connection that the server shuts down: each finishes its in-flight
    /// requests and closes (HTTP/1.1 without keep-alive, HTTP/2 with GOAWAY).
    pub fn drain_all(&self) {
        if let Ok(table) = self.table.lock() {
            for conn in table.conns.values() {
                conn.drain();
            }
        }
    }

    /// Resolves when no connection is open any more.
    pub async fn all_closed(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.open() == 0 {
                return;
            }
            emptied.await;
        }
    }

    /// Whether open connections are above [`PRESSURE_PERCENT`] of the cap.
    pub fn under_pressure(&self) -> bool {
        self.open() * 100 > self.max_connections.load(Ordering::Relaxed) * PRESSURE_PERCENT
    }

    /// Admits a connection from `ip`, evicting another one if the cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refused> {
        let key = ClientKey::of(ip);
        let now = Instant::now();
        let Ok(mut table) = self.table.lock() else {
            return Err(Refused::Full);
        };
        if table.per_client.get(&key).copied().unwrap_or(0)
            >= self.max_per_ip.load(Ordering::Relaxed)
        {
            return Err(Refused::PerIp);
        }
        let staying = table.conns.values().filter(|c| !c.is_leaving()).count();
        let mut evicted = None;
        if staying >= self.max_connections.load(Ordering::Relaxed) {
            let views: Vec<ConnView> = table
                .conns
                .values()
                .filter(|c| !c.is_leaving())
                .map(|c| c.view(now))
                .collect();
            let Some((id, reason)) = pick_victim(&views, self.min_rate.load(Ordering::Relaxed))
            else {
                return Err(Refused::Full);
            };
            if let Some(victim) = table.conns.get(&id) {
                victim.evict(BodyKill::TooSlow, now);
            }
            evicted = Some(reason);
        }
        table.next_id += 1;
        let track = Arc::new(ConnTrack::new(table.next_id, key, self.epoch));
        table.conns.insert(track.id, track.clone());
        *table.per_client.entry(key).or_insert(0) += 1;
        Ok(Admitted {
            admission: self.clone(),
            track,
            evicted,
        })
    }

    /// Applies the pressure rules to every connection (when under pressure) and closes
    /// evicted connections that outstayed [`EVICT_GRACE`]; returns what was shed.
    pub fn sweep(&self, limits: &PressureLimits) -> Vec<ShedReason> {
        let now = Instant::now();
        let pressure = self.under_pressure();
        let Ok(table) = self.table.lock() else {
            return Vec::new();
        };
        let mut shed = Vec::new();
        for conn in table.conns.values() {
            let evicted = conn.evicted_nanos.load(Ordering::Acquire);
            if evicted != 0 {
                let at = conn.epoch + Duration::from_nanos(evicted);
                if now.saturating_duration_since(at) >= EVICT_GRACE {
                    conn.close_now();
                }
                continue;
            }
            if !pressure {
                continue;
            }
            if let Some((reason, kill)) = under_pressure(conn.view(now).state, limits) {
                match kill {
                    Some(how) => {
                        conn.evict(how, now);
                    }
                    None => conn.close_now(),
                }
                shed.push(reason);
            }
        }
        shed
    }
}

fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    now.saturating_duration_since(epoch).as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;

    fn body(id: u64, age_ms: u64, bytes: u64) -> ConnView {
        ConnView {
            id,
            state: ConnState::Body {
                age: Duration::from_millis(age_ms),
                bytes,
                since_data: Duration::ZERO,
            },
        }
    }

    #[test]
    fn the_body_furthest_behind_is_evicted_first() {
        let conns = [
            ConnView {
                id: 1,
                state: ConnState::Idle {
                    for_: Duration::from_secs(30),
                },
            },
            body(2, 3000, 100),        // 2 s behind at 1 KiB/s: 1948 bytes behind
            body(3, 5000, 10),         // 4086 bytes behind
            body(4, 900, 0),           // inside its first second: not behind
            body(5, 10_000, 10 * KIB), // keeps up
            ConnView {
                id: 6,
                state: ConnState::Busy,
            },
        ];
        assert_eq!(
            pick_victim(&conns, KIB),
            Some((3, ShedReason::EvictSlowBody))
        );
        assert_eq!(
            pick_victim(&conns[..1], KIB),
            Some((1, ShedReason::EvictIdle))
        );
        let healthy = [conns[3], conns[4], conns[5]];
        assert_eq!(pick_victim(&healthy, KIB), None);
    }

    #[test]
    fn slow_heads_go_before_idle_connections() {
        let conns = [
            ConnView {
                id: 1,
                state: ConnState::Idle {
                    for_: Duration::from_secs(30),
                },
            },
            ConnView {
                id: 2,
                state: ConnState::Head {
                    age: Duration::from_millis(500),
                },
            },
            ConnView {
                id: 3,
                state: ConnState::Head {
                    age: Duration::from_secs(4),
                },
            },
        ];
        assert_eq!(
            pick_victim(&conns, KIB),
            Some((3, ShedReason::EvictSlowHead))
        );
        assert_eq!(
            pick_victim(&conns[..2], KIB),
            Some((1, ShedReason::EvictIdle))
        );
    }

    #[test]
    fn pressure_shrinks_timeouts_and_applies_the_minimum_rate_after_the_grace() {
        let limits = PressureLimits::new(Duration::from_secs(10), Duration::from_secs(30), KIB);
        assert_eq!(limits.header, Duration::from_secs(2));
        assert_eq!(limits.body_idle, Duration::from_secs(6));
        let short = PressureLimits::new(Duration::from_secs(2), Duration::from_secs(3), KIB);
        assert_eq!(short.header, PRESSURE_TIMEOUT_FLOOR);
        let at = |age_s: u64, bytes: u64, since_data_s: u64| {
            under_pressure(
                ConnState::Body {
                    age: Duration::from_secs(age_s),
                    bytes,
                    since_data: Duration::from_secs(since_data_s),
                },
                &limits,
            )
        };
        assert_eq!(at(4, 0, 1), None, "inside the grace");
        assert_eq!(
            at(5, 100, 1),
            Some((ShedReason::BelowMinRate, Some(BodyKill::TooSlow)))
        );
        assert_eq!(at(5, 6 * KIB, 1), None);
        assert_eq!(
            at(20, 100 * KIB, 6),
            Some((
                ShedReason::PressureTimeout,
                Some(BodyKill::Idle(Duration::from_secs(6)))
            ))
        );
        assert_eq!(
            under_pressure(
                ConnState::Idle {
                    for_: Duration::from_secs(2)
                },
                &limits
            ),
            Some((ShedReason::PressureTimeout, None))
        );
        assert_eq!(under_pressure(ConnState::Busy, &limits), None);
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientKey::of(a), ClientKey::of(b));
        assert_ne!(ClientKey::of(a), ClientKey::of(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            ClientKey::of(mapped),
            ClientKey::of("10.0.0.1".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn shutdown_drains_every_connection_and_waits_for_the_last() {
        let admission = Admission::new(10, 10, KIB);
        let a = admission.admit("127.0.0.2".parse().unwrap()).unwrap();
        let b = admission.admit("127.0.0.3".parse().unwrap()).unwrap();
        admission.drain_all();
        // Each is told to drain; once acted on, only a shed would stop it again.
        assert_eq!(a.track.stopped(false).await, Stop::Drain);
        assert_eq!(b.track.stopped(false).await, Stop::Drain);
        let quiet = tokio::time::timeout(Duration::from_millis(50), a.track.stopped(true)).await;
        assert!(quiet.is_err(), "a drained connection is not shed");
        // The server waits for every connection that is still open, drained or not.
        let late = admission.admit("127.0.0.4".parse().unwrap()).unwrap();
        let closed = admission.clone();
        let all = tokio::spawn(async move { closed.all_closed().await });
        drop((a, b));
        tokio::task::yield_now().await;
        assert!(!all.is_finished(), "one connection is still open");
        drop(late);
        tokio::time::timeout(Duration::from_secs(1), all)
            .await
            .expect("all_closed resolves when the last connection leaves")
            .unwrap();
        assert_eq!(admission.open(), 0);
    }

    #[tokio::test]
    async fn admission_caps_per_client_and_evicts_idle_connections_at_the_cap() {
        let admission = Admission::new(2, 1, KIB);
        let a = admission.admit("127.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(
            admission.admit("127.0.0.2".parse().unwrap()).unwrap_err(),
            Refused::PerIp
        );
        let b = admission.admit("127.0.0.3".parse().unwrap()).unwrap();
        // Both busy: the next one is refused.
        let _ga = a.track.request_started();
        let _gb = b.track.request_started();
        assert_eq!(
            admission.admit("127.0.0.4".parse().unwrap()).unwrap_err(),
            Refused::Full
        );
        drop(_gb);
        // b is idle now: it is evicted (closed) to make room.
        let c = admission.admit("127.0.0.4".parse().unwrap()).unwrap();
        assert_eq!(c.evicted, Some(ShedReason::EvictIdle));
        tokio::time::timeout(Duration::from_secs(1), b.track.stopped(true))
            .await
            .expect("the evicted connection was told to close");
        drop(b);
        assert_eq!(admission.open(), 2);
        drop((a, c));
        assert_eq!(admission.open(), 0);
    }
}
