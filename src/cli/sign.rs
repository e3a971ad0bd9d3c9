//! `payload-guard sign` and `payload-guard verify`: a route's signature scheme on a payload
//! file, offline. `sign` prints the headers the sender would send with the body (to test a
//! receiver, or to replay a payload by hand); `verify` checks headers against a body as the
//! proxy would.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{Config, RouteConfig, VerifyConfig};
use crate::verify::Signed;

use super::{EXIT_DATAERR, EXIT_OK, EXIT_PROBLEMS, emit};

/// What `sign` and `verify` read.
pub(super) struct Input<'a> {
    /// The route whose `[routes.verify]` applies.
    pub(super) route: &'a str,
    /// The payload file.
    pub(super) file: &'a Path,
    /// The URL the sender calls (default: the route's `public_url`).
    pub(super) url: Option<&'a str>,
}

/// Prints the headers a sender would send with the body; exit 0, or 65 on bad input.
pub(super) fn sign(
    config: &Path,
    input: &Input<'_>,
    timestamp: Option<u64>,
    id: Option<String>,
) -> u8 {
    let config = match Config::load(config) {
        Ok(config) => config,
        Err(err) => return super::config_failed(&err),
    };
    let result = (|| -> anyhow::Result<String> {
        let (route, v) = route_verify(&config, input.route)?;
        let body = read(input.file)?;
        let call_id = crate::trim::string_at(&body, &route.id_path);
        let url = sender_url(v, input.url);
        let now = timestamp.map_or_else(SystemTime::now, |secs| {
            UNIX_EPOCH + Duration::from_secs(secs)
        });
        let empty = HeaderMap::new();
        let headers = v
            .verifier
            .sign_request(
                &Signed {
                    headers: &empty,
                    body: &body,
                    call_id: call_id.as_deref(),
                    url: url.as_deref(),
                    now,
                },
                id,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot sign {}", input.file.display()))?;
        let mut out = String::new();
        for (name, value) in &headers {
            out.push_str(&format!(
                "{}: {}\n",
                display_name(name),
                value.to_str().unwrap_or("")
            ));
        }
        Ok(out)
    })();
    match result {
        Ok(text) => {
            emit(&text);
            EXIT_OK
        }
        Err(err) => {
            eprintln!("payload-guard sign: {err:#}");
            EXIT_DATAERR
        }
    }
}

/// Checks `headers` (`Name: value` each) against the body; exit 0 valid, 1 refused (with the
/// reason), 65 on bad input.
pub(super) fn verify(config: &Path, input: &Input<'_>, headers: &[String]) -> u8 {
    let config = match Config::load(config) {
        Ok(config) => config,
        Err(err) => return super::config_failed(&err),
    };
    let result = (|| -> anyhow::Result<Result<String, String>> {
        let (route, v) = route_verify(&config, input.route)?;
        let body = read(input.file)?;
        let mut map = HeaderMap::new();
        for line in headers {
            let (name, value) = line.split_once(':').with_context(|| {
                format!("{line:?} is not a header: write it as \"Name: value\"")
            })?;
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .with_context(|| format!("{:?} is not a valid header name", name.trim()))?;
            let value = HeaderValue::from_str(value.trim())
                .with_context(|| format!("the value of {name} is not a valid header value"))?;
            map.append(name, value);
        }
        let call_id = crate::trim::string_at(&body, &route.id_path);
        let url = sender_url(v, input.url);
        let verdict = v.verifier.verify(&Signed {
            headers: &map,
            body: &body,
            call_id: call_id.as_deref(),
            url: url.as_deref(),
            now: SystemTime::now(),
        });
        Ok(match verdict {
            Ok(verified) => {
                let mut text = format!(
                    "valid: {} signature in {}",
                    v.verifier.scheme().as_str(),
                    display_name(&verified.header)
                );
                if let Some(ts) = &verified.timestamp {
                    text.push_str(&format!(", timestamp {ts}"));
                }
                if let Some(id) = &verified.id {
                    text.push_str(&format!(", id {id}"));
                }
                text.push('\n');
                Ok(text)
            }
            Err(err) => Err(format!("refused ({}): {err}", err.as_str())),
        })
    })();
    match result {
        Ok(Ok(text)) => {
            emit(&text);
            EXIT_OK
        }
        Ok(Err(refused)) => {
            eprintln!("{refused}");
            EXIT_PROBLEMS
        }
        Err(err) => {
            eprintln!("payload-guard verify: {err:#}");
            EXIT_DATAERR
        }
    }
}

fn route_verify<'c>(
    config: &'c Config,
    name: &str,
) -> anyhow::Result<(&'c RouteConfig, &'c VerifyConfig)> {
    let Some(route) = config.route(name) else {
        let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        bail!(
            "no route named {name:?} in {} (routes: {})",
            config.source.display(),
            names.join(", ")
        );
    };
    let Some(v) = route.verify.as_ref() else {
        bail!("route {name:?} has no [routes.verify] table: nothing to sign or verify with");
    };
    Ok((route, v))
}

fn read(file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

/// `--url`, else the route's `public_url`.
fn sender_url(v: &VerifyConfig, url: Option<&str>) -> Option<String> {
    url.map(str::to_owned).or_else(|| v.public_url.clone())
}

/// A header name as senders write it (`Stripe-Signature`, `X-Retell-Signature`).
fn display_name(name: &HeaderName) -> String {
    name.as_str()
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_read_as_senders_write_them() {
        assert_eq!(
            display_name(&HeaderName::from_static("x-retell-signature")),
            "X-Retell-Signature"
        );
        assert_eq!(
            display_name(&HeaderName::from_static("webhook-id")),
            "Webhook-Id"
        );
    }
}
