//! Phase 2, plan (pure): how one request's body is handled, from the route and what the
//! headers say, before any body byte is read.

use crate::config::{OnOversize, OnTrimFailure, RouteConfig};
use crate::prepare::Policy;
use crate::trim::payload::{self, Encoding, Units};

/// What [`plan`] looks at besides the route.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts<'a> {
    /// `Content-Type`.
    pub content_type: Option<&'a str>,
    /// `Content-Encoding`.
    pub content_encoding: Option<&'a str>,
    /// The declared `Content-Length`.
    pub declared: Option<u64>,
    /// The receiver limit in force.
    pub limit: Option<u64>,
    /// The spool is open (spool routes can stage large bodies on disk).
    pub spool_ready: bool,
}

/// How one request's body will be handled.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Refuse now: the declared length is over the receiver's limit and the route rejects.
    Reject {
        /// The declared size.
        size: u64,
        /// The limit.
        limit: u64,
        /// Why a trim route cannot trim this payload, if that is the reason.
        untrimmable: Option<String>,
    },
    /// Stream it, cut off past `hard_limit`.
    Stream {
        /// The limit that fails the body (`max_body`, or the receiver's limit when rejecting).
        hard_limit: u64,
        /// Why a trim route streams instead of trimming (not JSON, unknown encoding), if so.
        untrimmable: Option<String>,
    },
    /// Collect it (within `max_body` and the buffer budget): to verify the sender, to trim
    /// it, to answer a receiver's 413 by trimming lower, to dedupe it, or to keep it until
    /// the receiver has taken it.
    Buffer {
        /// The body's `Content-Encoding` (`None`: one the proxy cannot decode).
        encoding: Option<Encoding>,
    },
    /// A spool route's large (or unknown-length) body that needs nothing else: written to a
    /// staging file as it arrives and forwarded from there, so memory stays bounded.
    Stage {
        /// The body's `Content-Encoding` (`None`: one the proxy cannot decode).
        encoding: Option<Encoding>,
    },
}

/// Decides how to handle a body (pure). A route that trims buffers its JSON payloads: always
/// while the 413 ladder is on (`retry_on_413`, the default), else whenever the payload may be
/// over the receiver's limit (unknown length, declared over, compressed with the limit
/// counting decoded bytes); a route that verifies, dedupes or spools always keeps the body;
/// everything else streams.
pub fn plan(cfg: &RouteConfig, facts: &Facts<'_>) -> Plan {
    let over = |size: Option<u64>| matches!((size, facts.limit), (Some(s), Some(l)) if s > l);
    let encoding = payload::encoding(facts.content_encoding);
    if cfg.on_oversize == OnOversize::Reject
        && let (Some(size), Some(limit)) = (facts.declared, facts.limit)
        && size > limit
    {
        return Plan::Reject {
            size,
            limit,
            untrimmable: None,
        };
    }
    let policy = Policy::of(cfg);
    if cfg.verify.is_some() || cfg.spool || cfg.dead_letter || cfg.dedupe.is_some() {
        let stage = cfg.spool
            && facts.spool_ready
            && cfg.verify.is_none()
            && cfg.dedupe.is_none()
            && policy.is_none()
            && facts
                .declared
                .is_none_or(|len| len > cfg.spool_memory_threshold);
        return if stage {
            Plan::Stage {
                encoding: encoding.ok(),
            }
        } else {
            Plan::Buffer {
                encoding: encoding.ok(),
            }
        };
    }
    let Some(policy) = policy else {
        return match facts.limit {
            Some(limit) if cfg.on_oversize == OnOversize::Reject => Plan::Stream {
                hard_limit: limit.min(cfg.max_body_bytes),
                untrimmable: None,
            },
            _ => Plan::Stream {
                hard_limit: cfg.max_body_bytes,
                untrimmable: None,
            },
        };
    };
    let problem = if !payload::is_json(facts.content_type) {
        Some(format!(
            "not JSON (content-type {})",
            facts.content_type.unwrap_or("missing")
        ))
    } else {
        match &encoding {
            Err(enc) => Some(format!("unsupported content-encoding {enc}")),
            Ok(_) => None,
        }
    };
    if let Some(problem) = problem {
        let rejects = cfg
            .trim
            .as_ref()
            .is_some_and(|tc| tc.on_failure == OnTrimFailure::Reject && !tc.dry_run);
        return match facts.limit {
            Some(limit) if rejects && over(facts.declared) => Plan::Reject {
                size: facts.declared.unwrap_or(0),
                limit,
                untrimmable: Some(problem),
            },
            Some(limit) if rejects => Plan::Stream {
                hard_limit: limit.min(cfg.max_body_bytes),
                untrimmable: Some(problem),
            },
            _ => Plan::Stream {
                hard_limit: cfg.max_body_bytes,
                untrimmable: Some(problem),
            },
        };
    }
    let compressed = encoding.as_ref().is_ok_and(|e| *e != Encoding::Identity);
    let ladder = cfg.retry_on_413 && !policy.dry_run;
    // With the 413 ladder on (the default), every JSON payload is held until the receiver
    // has answered, so a 413 — even one the configured limit did not predict — is answered by
    // trimming lower and resending instead of being passed back to the sender.
    let buffer = ladder
        || facts.declared.is_none()
        || over(facts.declared)
        || (compressed && policy.units == Units::Decoded);
    if buffer {
        Plan::Buffer {
            encoding: encoding.ok(),
        }
    } else {
        Plan::Stream {
            hard_limit: cfg.max_body_bytes,
            untrimmable: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn route(keys: &str) -> RouteConfig {
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
[[routes]]
name = "r"
path_prefix = "/hooks"
upstream = "http://127.0.0.1:3000/"
max_body = "10MiB"
{keys}
"#
        );
        let config = Config::from_str(&text, std::path::Path::new("/tmp/plan.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        config.routes[0].clone()
    }

    const TRIM: &str = r#"
on_oversize = "trim"
[[routes.trim]]
path = "call.transcript"
action = "truncate"
"#;

    fn facts(declared: Option<u64>, limit: Option<u64>) -> Facts<'static> {
        Facts {
            content_type: Some("application/json"),
            content_encoding: None,
            declared,
            limit,
            spool_ready: true,
        }
    }

    fn stream(hard_limit: u64) -> Plan {
        Plan::Stream {
            hard_limit,
            untrimmable: None,
        }
    }

    const BUFFER: Plan = Plan::Buffer {
        encoding: Some(Encoding::Identity),
    };

    #[test]
    fn every_branch() {
        let mib = 1024 * 1024;
        let max = 10 * mib;
        let trim_limited = format!("upstream_limit = \"1MiB\"\n{TRIM}");
        let trim_no_retry = format!("upstream_limit = \"1MiB\"\nretry_on_413 = false\n{TRIM}");
        let gzip_decoded = Facts {
            content_encoding: Some("gzip"),
            ..facts(Some(100), Some(mib))
        };
        let not_json = Facts {
            content_type: Some("text/plain"),
            ..facts(Some(2 * mib), Some(mib))
        };
        let table: Vec<(&str, String, Facts<'_>, Plan)> = vec![
            (
                "forward route streams",
                String::new(),
                facts(Some(2 * mib), None),
                stream(max),
            ),
            (
                "reject route refuses a declared oversize",
                "upstream_limit = \"1MiB\"\non_oversize = \"reject\"".into(),
                facts(Some(2 * mib), Some(mib)),
                Plan::Reject {
                    size: 2 * mib,
                    limit: mib,
                    untrimmable: None,
                },
            ),
            (
                "reject route streams under a hard limit when the length is unknown",
                "upstream_limit = \"1MiB\"\non_oversize = \"reject\"".into(),
                facts(None, Some(mib)),
                stream(mib),
            ),
            (
                "trim route, fits by its length: held for the ladder",
                trim_limited.clone(),
                facts(Some(100), Some(mib)),
                BUFFER,
            ),
            (
                "trim route without retries, over",
                trim_no_retry.clone(),
                facts(Some(2 * mib), Some(mib)),
                BUFFER,
            ),
            (
                "trim route, over",
                trim_limited.clone(),
                facts(Some(2 * mib), Some(mib)),
                BUFFER,
            ),
            (
                "trim route, unknown length",
                trim_limited.clone(),
                facts(None, Some(mib)),
                BUFFER,
            ),
            (
                "trim route, unknown limit: ready for the ladder",
                TRIM.into(),
                facts(Some(100), None),
                BUFFER,
            ),
            (
                "trim route without retries, fits",
                trim_no_retry.clone(),
                facts(Some(100), Some(mib)),
                stream(max),
            ),
            (
                "trim route without retries, unknown limit",
                format!("retry_on_413 = false\n{TRIM}"),
                facts(Some(100), None),
                stream(max),
            ),
            (
                "trim route counting decoded bytes, gzip",
                format!("upstream_limit = \"1MiB\"\nlimit_counts = \"decoded\"\n{TRIM}"),
                gzip_decoded,
                Plan::Buffer {
                    encoding: Some(Encoding::Gzip),
                },
            ),
            (
                "trim route without retries counting wire bytes, gzip that fits",
                trim_no_retry.clone(),
                gzip_decoded,
                stream(max),
            ),
            (
                "trim route, not JSON and over: refused",
                trim_limited.clone(),
                not_json,
                Plan::Reject {
                    size: 2 * mib,
                    limit: mib,
                    untrimmable: Some("not JSON (content-type text/plain)".into()),
                },
            ),
            (
                "trim route forwarding failures, not JSON: streamed",
                format!("upstream_limit = \"1MiB\"\non_trim_failure = \"forward\"\n{TRIM}"),
                not_json,
                Plan::Stream {
                    hard_limit: max,
                    untrimmable: Some("not JSON (content-type text/plain)".into()),
                },
            ),
            (
                "spool route, small body: buffered",
                "spool = true".into(),
                facts(Some(100), None),
                BUFFER,
            ),
            (
                "spool route, large body: staged",
                "spool = true".into(),
                facts(Some(2 * mib), None),
                Plan::Stage {
                    encoding: Some(Encoding::Identity),
                },
            ),
            (
                "spool route, unknown length: staged",
                "spool = true".into(),
                facts(None, None),
                Plan::Stage {
                    encoding: Some(Encoding::Identity),
                },
            ),
            (
                "dedupe route: buffered",
                "dedupe = \"24h\"".into(),
                facts(Some(2 * mib), None),
                BUFFER,
            ),
            (
                "spool and dedupe: buffered",
                "spool = true\ndedupe = \"1h\"".into(),
                facts(Some(2 * mib), None),
                BUFFER,
            ),
        ];
        for (name, keys, facts, want) in table {
            assert_eq!(plan(&route(&keys), &facts), want, "{name}");
        }
    }
}
