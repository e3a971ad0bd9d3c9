//! Names the component that answered a receiver's 413, from the response's status, headers and
//! body, so that `diagnose` can print the exact setting to change (pure).
//!
//! The checks go from the most specific mark to the weakest: platform headers (Cloudflare,
//! AWS) first, because those platforms front other servers and their pages can look like
//! nginx's; then `Server` / `X-Powered-By`; then the default error pages' wording, which
//! survives a `Server` header stripped by a load balancer. The fixtures under
//! `src/incident/fixtures/` are the evidence for each rule; each names its source.

use serde::{Deserialize, Serialize};

/// How much of the body is searched: every default error page is far shorter.
const BODY_SCAN_BYTES: usize = 4096;

/// The component that answered 413.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Rejector {
    /// nginx (and OpenResty): `client_max_body_size`.
    #[serde(rename = "nginx")]
    Nginx,
    /// Express with body-parser: `PayloadTooLargeError`.
    #[serde(rename = "express")]
    Express,
    /// Werkzeug (Flask): `MAX_CONTENT_LENGTH`.
    #[serde(rename = "werkzeug")]
    Werkzeug,
    /// Cloudflare's edge: a plan limit.
    #[serde(rename = "cloudflare")]
    Cloudflare,
    /// Amazon API Gateway (or the Lambda behind it): a hard platform limit.
    #[serde(rename = "aws-api-gateway")]
    AwsApiGateway,
    /// Caddy: `request_body { max_size }`.
    #[serde(rename = "caddy")]
    Caddy,
    /// Envoy (and Istio gateways): buffer limits.
    #[serde(rename = "envoy")]
    Envoy,
    /// Traefik: the `buffering` middleware.
    #[serde(rename = "traefik")]
    Traefik,
    /// HAProxy: a `deny_status 413` rule.
    #[serde(rename = "haproxy")]
    Haproxy,
    /// Apache Tomcat: `maxPostSize`.
    #[serde(rename = "tomcat")]
    Tomcat,
    /// Nothing identified it.
    #[serde(rename = "unknown")]
    Unknown,
}

impl Rejector {
    /// The stable name used in the log and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejector::Nginx => "nginx",
            Rejector::Express => "express",
            Rejector::Werkzeug => "werkzeug",
            Rejector::Cloudflare => "cloudflare",
            Rejector::AwsApiGateway => "aws-api-gateway",
            Rejector::Caddy => "caddy",
            Rejector::Envoy => "envoy",
            Rejector::Traefik => "traefik",
            Rejector::Haproxy => "haproxy",
            Rejector::Tomcat => "tomcat",
            Rejector::Unknown => "unknown",
        }
    }
}

/// Names the component behind a receiver's response. `headers` are `(name, value)` pairs with
/// lowercase names. Anything but a 413 is [`Rejector::Unknown`]: only size refusals are
/// fingerprinted.
pub fn fingerprint(status: u16, headers: &[(String, String)], body: &[u8]) -> Rejector {
    if status != 413 {
        return Rejector::Unknown;
    }
    let header = |name: &str| -> Option<String> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let has = |name: &str| headers.iter().any(|(n, _)| n == name);
    let server = header("server").unwrap_or_default();
    let body = String::from_utf8_lossy(&body[..body.len().min(BODY_SCAN_BYTES)]).to_lowercase();

    // Platforms first: Cloudflare's edge and CloudFront front other servers.
    if server == "cloudflare" || has("cf-ray") || body.contains("<center>cloudflare</center>") {
        return Rejector::Cloudflare;
    }
    if has("x-amzn-requestid")
        || has("x-amz-apigw-id")
        || has("x-amzn-errortype")
        || body.contains("http content length exceeded")
        || body.contains("\"request too long\"")
    {
        return Rejector::AwsApiGateway;
    }

    // Banners.
    if server.contains("envoy") {
        return Rejector::Envoy;
    }
    if server.starts_with("caddy") {
        return Rejector::Caddy;
    }
    if server.starts_with("werkzeug") {
        return Rejector::Werkzeug;
    }
    if server.starts_with("nginx") || server.starts_with("openresty") {
        return Rejector::Nginx;
    }
    if server.contains("tomcat") || server.contains("coyote") {
        return Rejector::Tomcat;
    }
    if server.contains("haproxy") {
        return Rejector::Haproxy;
    }
    if server.contains("traefik") {
        return Rejector::Traefik;
    }
    if header("x-powered-by").is_some_and(|v| v.contains("express")) {
        return Rejector::Express;
    }

    // Default error pages, for when a banner was stripped or never sent.
    if body.contains("payloadtoolargeerror")
        || (body.contains("<pre>payload too large</pre>")
            && header("content-security-policy").is_some_and(|v| v.contains("default-src 'none'")))
    {
        // finalhandler's page: the stack in development, the bare status text in production.
        return Rejector::Express;
    }
    if body.contains("the data value transmitted exceeds the capacity limit") {
        return Rejector::Werkzeug;
    }
    if body.contains("<center>nginx") || body.contains("<center>openresty") {
        return Rejector::Nginx;
    }
    if body.contains("the request entity exceeds the maximum allowed") {
        return Rejector::Haproxy;
    }
    if body.contains("apache tomcat") || body.contains("<title>http status 413") {
        return Rejector::Tomcat;
    }
    // Traefik's buffering middleware writes Go's bare status text and no Server header. Any
    // Go server doing `http.Error(w, http.StatusText(413), 413)` looks the same, so this is
    // the weakest rule and comes last.
    if server.is_empty() && body.trim() == "request entity too large" {
        return Rejector::Traefik;
    }
    Rejector::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture file: `#` comment lines, then a raw HTTP response (status line, headers, a
    /// blank line, the body). Header lines end in LF; the body is kept as captured.
    struct Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    fn parse_fixture(raw: &[u8]) -> Response {
        let mut rest = raw;
        while rest.starts_with(b"#") {
            let end = rest.iter().position(|&b| b == b'\n').unwrap();
            rest = &rest[end + 1..];
        }
        let split = rest.windows(2).position(|w| w == b"\n\n").unwrap();
        let head = std::str::from_utf8(&rest[..split]).unwrap();
        let body = rest[split + 2..].to_vec();
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        Response {
            status,
            headers,
            body,
        }
    }

    macro_rules! fixture {
        ($name:literal) => {
            (
                $name,
                include_bytes!(concat!("fixtures/", $name)).as_slice(),
            )
        };
    }

    #[test]
    fn every_fixture_is_named() {
        let cases = [
            (fixture!("nginx.http"), Rejector::Nginx),
            (fixture!("express.http"), Rejector::Express),
            (fixture!("express-production.http"), Rejector::Express),
            (fixture!("werkzeug.http"), Rejector::Werkzeug),
            (fixture!("cloudflare.http"), Rejector::Cloudflare),
            (fixture!("aws-api-gateway.http"), Rejector::AwsApiGateway),
            (
                fixture!("aws-api-gateway-lambda.http"),
                Rejector::AwsApiGateway,
            ),
            (fixture!("caddy.http"), Rejector::Caddy),
            (fixture!("envoy.http"), Rejector::Envoy),
            (fixture!("traefik.http"), Rejector::Traefik),
            (fixture!("haproxy.http"), Rejector::Haproxy),
            (fixture!("tomcat.http"), Rejector::Tomcat),
            (fixture!("unknown.http"), Rejector::Unknown),
        ];
        for ((name, raw), want) in cases {
            let r = parse_fixture(raw);
            assert_eq!(r.status, 413, "{name}");
            assert_eq!(fingerprint(r.status, &r.headers, &r.body), want, "{name}");
        }
    }

    #[test]
    fn body_marks_survive_a_stripped_server_header() {
        for (name, raw) in [
            fixture!("nginx.http"),
            fixture!("werkzeug.http"),
            fixture!("tomcat.http"),
            fixture!("express.http"),
        ] {
            let r = parse_fixture(raw);
            let stripped: Vec<_> = r
                .headers
                .iter()
                .filter(|(n, _)| n != "server" && n != "x-powered-by")
                .cloned()
                .collect();
            assert_eq!(
                fingerprint(413, &stripped, &r.body),
                fingerprint(413, &r.headers, &r.body),
                "{name}"
            );
        }
    }

    #[test]
    fn cloudflare_wins_over_the_nginx_look_of_its_page() {
        let r = parse_fixture(fixture!("cloudflare.http").1);
        let no_headers: Vec<(String, String)> = Vec::new();
        assert_eq!(fingerprint(413, &no_headers, &r.body), Rejector::Cloudflare);
    }

    #[test]
    fn only_413_is_fingerprinted() {
        let r = parse_fixture(fixture!("nginx.http").1);
        assert_eq!(fingerprint(502, &r.headers, &r.body), Rejector::Unknown);
    }

    #[test]
    fn names_round_trip_through_serde() {
        for r in [
            Rejector::Nginx,
            Rejector::AwsApiGateway,
            Rejector::Unknown,
            Rejector::Tomcat,
        ] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<Rejector>(&json).unwrap(), r);
        }
    }
}
