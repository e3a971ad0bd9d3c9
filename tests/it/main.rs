//! Integration tests: the proxy in-process (or as the built binary) in front of real receivers
//! on 127.0.0.1, driven by real HTTP clients.

mod cli;
mod console;
mod delivery;
mod demo;
mod early413;
mod express;
mod forwarding;
mod hardening;
mod incidents;
mod limits;
mod logging;
mod nginx;
mod ops;
mod overload;
mod pg;
mod refusals;
mod replicas;
mod senders;
mod shared_state;
mod spool;
mod spool_store;
mod support;
mod trimming;
mod upstream;
mod werkzeug;
