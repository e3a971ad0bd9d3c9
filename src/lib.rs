//! payload-guard: a streaming reverse proxy that sits in front of webhook receivers and makes
//! payload-size limits a solved problem.
//!
//! # Layout
//! The modules follow a request through the proxy:
//!
//! - [`config`]: `proxy.toml` → validated [`config::Config`] (serde mirror, then validation).
//! - [`server`]: accept loop, HTTP/1.1 + h2c, header timeout, connection cap, graceful shutdown.
//! - [`shed`]: admission under load: per-client caps, eviction at the cap, pressure timeouts.
//! - [`framing`]: follows HTTP/1 framing on the raw bytes to catch Content-Length + Transfer-Encoding.
//! - [`gate`]: a request's handler polled only when it was woken, not on every block of its body.
//! - [`runtime`]: what a running proxy serves with: the routes' runtime (replaced on reload) and
//!   the state shared across reloads.
//! - [`proxy`]: the per-request pipeline that calls the stages below, top to bottom.
//! - [`route`]: longest-prefix route matching on segment boundaries (pure).
//! - [`limit`]: `Content-Length` pre-check, then a counting body with idle and total timeouts.
//! - [`buffer`]: bounded buffering under a global budget, only when trimming may be needed.
//! - [`trim`]: byte-faithful JSON trimming by path rules (and the gzip/deflate wrapper).
//! - [`prepare`]: the one way a payload is made ready for its receiver (trim to a target,
//!   re-encode, re-sign, mark), used live, on every resend, on redelivery and by the CLI.
//! - [`forward`]: upstream clients (a connection per HTTP/1 sender connection for plain-HTTP
//!   receivers; pooled, TLS, HTTP/2 by ALPN otherwise), URI and header rewriting.
//! - [`verify`]: sender signatures, one module per scheme (Synthflow, Retell, ElevenLabs, Vapi,
//!   Stripe, GitHub, Standard Webhooks, Twilio, generic body HMAC), and re-signing a trimmed
//!   body in the sender's own scheme.
//! - [`judge`]: the one way a receiver's answer is judged (delivered, too large, retryable,
//!   final).
//! - [`deliver`]: sends a whole payload and answers 413s by trimming lower (the ladder);
//!   commits what cannot be delivered to the [`spool`] (on disk, or in PostgreSQL shared by
//!   replicas through [`db`]) and redelivers it in arrival order.
//! - [`state`]: learned receiver limits and the dedupe memory, kept in small state files.
//! - [`observe`]: the access-log line for each exchange.
//! - [`incident`]: the 413 incident log, fingerprints of who rejected, learned limits, diagnosis.
//! - [`metrics`]: Prometheus metrics for the admin listener.
//! - [`error`]: the one mapping from an error to a status, a culprit and an incident kind.
//! - [`warn_limit`]: repeated WARN events collapsed to one line per interval with a count.
//! - [`sizes`]: recent request sizes per route (an in-memory ring), for the console.
//! - [`admin`]: health, readiness, metrics and reload on the admin listener.
//! - [`console`]: the operator's console and its JSON API on the admin listener.
//! - [`cli`]: the `payload-guard` subcommands.
//! - [`alloc`]: the binary's global allocator (mimalloc, called without its aligned path when
//!   the alignment allows).

#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod admin;
pub mod alloc;
pub mod buffer;
pub mod cli;
pub mod config;
pub mod console;
pub mod db;
pub mod deliver;
pub mod error;
pub mod forward;
pub mod framing;
pub mod gate;
pub mod incident;
pub mod judge;
pub mod limit;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod prepare;
pub mod proxy;
pub mod route;
pub mod runtime;
pub mod server;
pub mod shed;
pub mod sizes;
pub mod spool;
pub mod state;
pub mod trim;
pub mod verify;
pub mod warn_limit;
