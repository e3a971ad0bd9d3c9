//! Sender authentication: checks a request's signature before the body goes any further, and
//! signs bodies for the receiver when the proxy re-signs a trimmed payload.
//!
//! One module per sender scheme, each with the sender's header names, signed-content layout and
//! encodings:
//!
//! | scheme | module | signed content | header |
//! |---|---|---|---|
//! | `synthflow` | [`synthflow`] | `call.call_id`, base64 | `Synthflow-Signature` |
//! | `hmac-sha256-body` | [`body`] | the body, hex or base64 | configured |
//! | `github` | [`body`] | the body, `sha256=<hex>` | `X-Hub-Signature-256` |
//! | `vapi` | [`vapi`] | the body, hex; or a shared secret | `X-Vapi-Signature`, `X-Vapi-Secret` |
//! | `retell` | [`retell`] | body + timestamp (ms), hex | `X-Retell-Signature: v=<ms>,d=<hex>` |
//! | `elevenlabs` | [`timestamped`] | `<t>.<body>`, hex | `ElevenLabs-Signature: t=<s>,v0=<hex>` |
//! | `stripe` | [`timestamped`] | `<t>.<body>`, hex | `Stripe-Signature: t=<s>,v1=<hex>` |
//! | `standard-webhooks` | [`standard_webhooks`] | `<id>.<t>.<body>`, base64 | `webhook-signature: v1,<b64>` |
//! | `twilio` | [`twilio`] | URL + sorted form params, HMAC-SHA1 base64 | `X-Twilio-Signature` |
//!
//! Schemes with a timestamp refuse a stale or future one ([`VerifyError::Expired`], outside
//! [`DEFAULT_TOLERANCE`] unless configured): a captured request cannot be replayed later.
//! Schemes that carry several signatures in one header (key rotation) accept the request when
//! any of them matches.
//!
//! Decoding is strict where it costs nothing: signatures must decode to exactly the tag length.
//! Base64 uses the standard alphabet; padding is optional. Hex is case-insensitive. Signatures
//! are compared in constant time. Nothing here ever prints the secret or the expected
//! signature.
//!
//! Everything is pure: headers, body, URL and the current time in, a verdict out. Re-signing
//! ([`Verifier::resign`]) writes the sender's own headers for a new body, keeping the id and
//! timestamp the sender signed, so a receiver's unchanged verification code accepts it.

pub mod body;
pub mod retell;
pub mod standard_webhooks;
pub mod synthflow;
pub mod timestamped;
pub mod twilio;
pub mod vapi;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, Mac};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use sha2::Sha256;

pub use synthflow::{HTTP_SYNTHFLOW_SIGNATURE, SYNTHFLOW_SIGNATURE};

type HmacSha256 = Hmac<Sha256>;

/// Length of an HMAC-SHA256 tag in bytes.
const TAG_BYTES: usize = 32;

/// How far a signed timestamp may be from the proxy's clock, either way, unless the route sets
/// `tolerance` (Stripe's, Retell's and Standard Webhooks' default).
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Longest signature header value read; anything longer is malformed without being parsed
/// (room for several rotated signatures).
const MAX_HEADER_CHARS: usize = 2048;

/// Standard alphabet; writes padding, reads it or its absence.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How a signature is written in its header (`hmac-sha256-body`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Lowercase hex when signing; either case when verifying.
    Hex,
    /// Standard base64 (`+`, `/`), padded when signing; padding optional when verifying.
    Base64,
}

impl Encoding {
    /// The configuration name: `hex` or `base64`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Hex => "hex",
            Encoding::Base64 => "base64",
        }
    }

    fn encode(self, tag: &[u8]) -> String {
        match self {
            Encoding::Hex => hex::encode(tag),
            Encoding::Base64 => BASE64.encode(tag),
        }
    }

    /// Decodes `text` into exactly `N` bytes, or says it is malformed.
    fn decode<const N: usize>(self, text: &str) -> Result<[u8; N], VerifyError> {
        let mut tag = [0u8; N];
        match self {
            Encoding::Hex => {
                hex::decode_to_slice(text, &mut tag).map_err(|_| VerifyError::Malformed)?;
            }
            Encoding::Base64 => {
                // Anything longer than N bytes' worth is refused before decoding.
                if text.len() > N.div_ceil(3) * 4 {
                    return Err(VerifyError::Malformed);
                }
                let bytes = BASE64.decode(text).map_err(|_| VerifyError::Malformed)?;
                tag = bytes.try_into().map_err(|_| VerifyError::Malformed)?;
            }
        }
        Ok(tag)
    }
}

impl FromStr for Encoding {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hex" => Ok(Encoding::Hex),
            "base64" => Ok(Encoding::Base64),
            other => Err(ConfigError::UnknownEncoding(other.to_owned())),
        }
    }
}

/// What is signed, and how the signature is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// HMAC-SHA256 over the `call.call_id` string, base64 (Synthflow post-call webhooks).
    Synthflow,
    /// HMAC-SHA256 over the whole body as received.
    HmacSha256Body {
        /// How the signature is written.
        encoding: Encoding,
    },
    /// GitHub: `X-Hub-Signature-256: sha256=<hex>` of the body.
    GitHub,
    /// Vapi: `X-Vapi-Signature` (HMAC-SHA256 of the body, hex) or a shared `X-Vapi-Secret`.
    Vapi,
    /// Retell AI: `X-Retell-Signature: v=<ms>,d=<hex>`, HMAC-SHA256 of body then timestamp.
    Retell,
    /// ElevenLabs: `ElevenLabs-Signature: t=<s>,v0=<hex>`, HMAC-SHA256 of `<t>.<body>`.
    ElevenLabs,
    /// Stripe: `Stripe-Signature: t=<s>,v1=<hex>`, HMAC-SHA256 of `<t>.<body>`.
    Stripe,
    /// Standard Webhooks (Svix): `webhook-signature: v1,<base64>` of `<id>.<t>.<body>`.
    StandardWebhooks,
    /// Twilio: `X-Twilio-Signature`, HMAC-SHA1 of the URL and the sorted form parameters.
    Twilio,
}

/// Every scheme's configuration name, in documentation order.
pub const SCHEME_NAMES: [&str; 9] = [
    "synthflow",
    "retell",
    "elevenlabs",
    "vapi",
    "stripe",
    "github",
    "standard-webhooks",
    "twilio",
    "hmac-sha256-body",
];

impl Scheme {
    /// Builds a scheme from its configuration name and optional encoding. Only
    /// `hmac-sha256-body` takes an encoding (default hex); the senders' schemes have theirs.
    pub fn from_config(name: &str, encoding: Option<Encoding>) -> Result<Self, ConfigError> {
        let scheme = match name {
            "synthflow" => Scheme::Synthflow,
            "hmac-sha256-body" => {
                return Ok(Scheme::HmacSha256Body {
                    encoding: encoding.unwrap_or(Encoding::Hex),
                });
            }
            "github" => Scheme::GitHub,
            "vapi" => Scheme::Vapi,
            "retell" => Scheme::Retell,
            "elevenlabs" => Scheme::ElevenLabs,
            "stripe" => Scheme::Stripe,
            "standard-webhooks" => Scheme::StandardWebhooks,
            "twilio" => Scheme::Twilio,
            other => return Err(ConfigError::UnknownScheme(other.to_owned())),
        };
        match encoding {
            Some(_) => Err(ConfigError::EncodingNotConfigurable(scheme.as_str())),
            None => Ok(scheme),
        }
    }

    /// The configuration name (`synthflow`, `stripe`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Synthflow => "synthflow",
            Scheme::HmacSha256Body { .. } => "hmac-sha256-body",
            Scheme::GitHub => "github",
            Scheme::Vapi => "vapi",
            Scheme::Retell => "retell",
            Scheme::ElevenLabs => "elevenlabs",
            Scheme::Stripe => "stripe",
            Scheme::StandardWebhooks => "standard-webhooks",
            Scheme::Twilio => "twilio",
        }
    }

    /// Whether the signed message is the `call.call_id` string, which the caller must extract
    /// from the JSON body and pass in [`Signed::call_id`].
    pub fn needs_call_id(self) -> bool {
        matches!(self, Scheme::Synthflow)
    }

    /// Whether the signature covers the URL the sender called ([`Signed::url`]; the route's
    /// `public_url`).
    pub fn needs_url(self) -> bool {
        matches!(self, Scheme::Twilio)
    }

    /// Whether the signature carries a timestamp checked against the tolerance.
    pub fn has_timestamp(self) -> bool {
        matches!(
            self,
            Scheme::Retell | Scheme::ElevenLabs | Scheme::Stripe | Scheme::StandardWebhooks
        )
    }

    /// Whether the signature covers the body, so a trimmed body needs a new one. Synthflow
    /// signs `call.call_id` only. Twilio signs the URL and form parameters (or the body's hash
    /// in the URL), which the proxy does not rewrite: it cannot be re-signed.
    pub fn signs_body(self) -> bool {
        !matches!(self, Scheme::Synthflow)
    }

    /// Whether `resign = "same"` can re-sign a trimmed body in this scheme.
    pub fn can_resign(self) -> bool {
        !matches!(self, Scheme::Twilio)
    }

    /// The headers a signature is read from by default, in order of preference (the first
    /// present is used). `hmac-sha256-body` has none and needs `header`.
    pub fn default_headers(self) -> Vec<HeaderName> {
        let h = HeaderName::from_static;
        match self {
            Scheme::Synthflow => vec![SYNTHFLOW_SIGNATURE, HTTP_SYNTHFLOW_SIGNATURE],
            Scheme::HmacSha256Body { .. } => Vec::new(),
            Scheme::GitHub => vec![h("x-hub-signature-256")],
            Scheme::Vapi => vec![vapi::X_VAPI_SIGNATURE, vapi::X_VAPI_SECRET],
            Scheme::Retell => vec![h("x-retell-signature")],
            Scheme::ElevenLabs => vec![h("elevenlabs-signature")],
            Scheme::Stripe => vec![h("stripe-signature")],
            Scheme::StandardWebhooks => vec![
                standard_webhooks::WEBHOOK_SIGNATURE,
                standard_webhooks::SVIX_SIGNATURE,
            ],
            Scheme::Twilio => vec![h("x-twilio-signature")],
        }
    }
}

/// A signing key. Its `Debug` prints `Secret(***)`; it has no `Display` and no accessor.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps the key bytes (for a secret from the environment, the UTF-8 bytes of the string).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    /// Whether the key is empty (refused by [`Verifier::new`]).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares `candidate` with the secret in constant time (for bearer tokens).
    pub fn matches(&self, candidate: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(candidate).into()
    }

    /// HMAC-SHA256 over the concatenation of `parts`.
    fn hmac_sha256(&self, parts: &[&[u8]]) -> [u8; TAG_BYTES] {
        // HMAC takes keys of any length (longer ones are hashed); this never fails.
        let mut mac =
            <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// HMAC-SHA1 over the concatenation of `parts` (Twilio, GitHub's legacy header).
    fn hmac_sha1(&self, parts: &[&[u8]]) -> [u8; 20] {
        let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length");
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Compares two tags in constant time.
fn tags_equal(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// Why a request's signature was not accepted. Messages name no secret and no signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// None of the configured signature headers is present.
    #[error(
        "no signature header: the sender did not sign the request, or signed it into a header this route does not read"
    )]
    Missing,
    /// The signature header is repeated, not visible ASCII, or not in the scheme's layout.
    #[error(
        "signature header is malformed: expected one value in the layout and encoding of the route's scheme"
    )]
    Malformed,
    /// The signature is well formed but wrong.
    #[error(
        "signature does not match: the request was signed with another secret, or the signed content changed"
    )]
    Mismatch,
    /// The signed timestamp is further from the proxy's clock than the tolerance (a replay, or
    /// a clock out of sync).
    #[error(
        "signature timestamp is outside the tolerance: a replayed request, or a clock out of sync"
    )]
    Expired,
    /// The scheme signs `call.call_id`, and the body has none.
    #[error("no call_id to verify the signature against: the body has no call.call_id string")]
    NoCallId,
    /// The scheme signs the URL, and the route has no `public_url`.
    #[error("no public URL to verify the signature against: set public_url on the route")]
    NoUrl,
    /// The scheme cannot re-sign a new body (Twilio signs the URL).
    #[error("this scheme cannot re-sign a changed body")]
    CannotResign,
}

impl VerifyError {
    /// Stable lowercase name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyError::Missing => "missing",
            VerifyError::Malformed => "malformed",
            VerifyError::Mismatch => "mismatch",
            VerifyError::Expired => "expired",
            VerifyError::NoCallId => "no_call_id",
            VerifyError::NoUrl => "no_url",
            VerifyError::CannotResign => "cannot_resign",
        }
    }
}

/// A verifier the configuration cannot build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The secret is empty (often an unset environment variable).
    #[error(
        "signature secret is empty: set the secret, or check that its environment variable is set"
    )]
    EmptySecret,
    /// A Standard Webhooks secret that is not `whsec_` followed by base64.
    #[error(
        "a standard-webhooks secret is \"whsec_\" followed by base64 (as the sender shows it): this one does not decode"
    )]
    BadStandardWebhooksSecret,
    /// `hmac-sha256-body` without a header name.
    #[error("scheme hmac-sha256-body needs a header name, e.g. header = \"X-Signature\"")]
    HeaderRequired,
    /// An encoding was given for a scheme whose encoding is fixed.
    #[error("scheme {0} has a fixed encoding: remove encoding (only hmac-sha256-body takes one)")]
    EncodingNotConfigurable(&'static str),
    /// Not one of [`SCHEME_NAMES`].
    #[error(
        "unknown signature scheme {0:?}: expected one of synthflow, retell, elevenlabs, vapi, stripe, github, standard-webhooks, twilio, hmac-sha256-body"
    )]
    UnknownScheme(String),
    /// Not `hex` or `base64`.
    #[error("unknown signature encoding {0:?}: expected \"hex\" or \"base64\"")]
    UnknownEncoding(String),
}

/// What a request offers for verification.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    /// The request headers as received.
    pub headers: &'a HeaderMap,
    /// The body exactly as received (before any decoding).
    pub body: &'a [u8],
    /// The JSON-decoded `call.call_id` of the body ([`Scheme::needs_call_id`]).
    pub call_id: Option<&'a str>,
    /// The full URL the sender called, query included ([`Scheme::needs_url`]).
    pub url: Option<&'a str>,
    /// The proxy's clock.
    pub now: SystemTime,
}

/// What an accepted signature said, kept so the proxy can re-sign a trimmed body with the
/// sender's own id and timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The header the accepted signature was read from.
    pub header: HeaderName,
    /// The sender's message id, when the scheme signs one (Standard Webhooks' `webhook-id`).
    pub id: Option<String>,
    /// The signed timestamp exactly as sent, when the scheme has one.
    pub timestamp: Option<String>,
}

/// Checks (and makes) one route's signatures: a scheme, the headers it is read from, a secret
/// and a timestamp tolerance.
#[derive(Debug, Clone)]
pub struct Verifier {
    scheme: Scheme,
    header_names: Vec<HeaderName>,
    secret: Secret,
    tolerance: Duration,
}

impl Verifier {
    /// Builds a verifier. `header` replaces the scheme's default headers
    /// ([`Scheme::default_headers`]); `hmac-sha256-body` has none and needs one. A
    /// `standard-webhooks` secret is `whsec_<base64>` and is decoded here.
    pub fn new(
        scheme: Scheme,
        header: Option<HeaderName>,
        secret: Secret,
    ) -> Result<Self, ConfigError> {
        if secret.is_empty() {
            return Err(ConfigError::EmptySecret);
        }
        let header_names = match header {
            Some(name) => vec![name],
            None => scheme.default_headers(),
        };
        if header_names.is_empty() {
            return Err(ConfigError::HeaderRequired);
        }
        let secret = match scheme {
            Scheme::StandardWebhooks => standard_webhooks::decode_secret(&secret)?,
            _ => secret,
        };
        Ok(Verifier {
            scheme,
            header_names,
            secret,
            tolerance: DEFAULT_TOLERANCE,
        })
    }

    /// Sets how far a signed timestamp may be from the clock (default [`DEFAULT_TOLERANCE`]).
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// The scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The timestamp tolerance.
    pub fn tolerance(&self) -> Duration {
        self.tolerance
    }

    /// The headers a signature is read from, in order of preference; signing writes the first
    /// (or the one the verified signature came from).
    pub fn header_names(&self) -> &[HeaderName] {
        &self.header_names
    }

    /// Checks the request's signature, and returns what re-signing needs.
    pub fn verify(&self, req: &Signed<'_>) -> Result<Verified, VerifyError> {
        match self.scheme {
            Scheme::Synthflow => synthflow::verify(self, req),
            Scheme::HmacSha256Body { .. } | Scheme::GitHub => body::verify(self, req),
            Scheme::Vapi => vapi::verify(self, req),
            Scheme::Retell => retell::verify(self, req),
            Scheme::ElevenLabs | Scheme::Stripe => timestamped::verify(self, req),
            Scheme::StandardWebhooks => standard_webhooks::verify(self, req),
            Scheme::Twilio => twilio::verify(self, req),
        }
    }

    /// Re-signs `body` (a trimmed payload) in the sender's own scheme, keeping the id and
    /// timestamp the sender signed, and writes the headers into `headers` (`resign = "same"`).
    /// Synthflow signatures and Vapi's shared secret do not cover the body: nothing changes.
    pub fn resign(
        &self,
        verified: &Verified,
        body: &[u8],
        headers: &mut HeaderMap,
    ) -> Result<(), VerifyError> {
        match self.scheme {
            Scheme::Synthflow => Ok(()),
            Scheme::HmacSha256Body { .. } | Scheme::GitHub => {
                body::write(self, verified, body, headers)
            }
            Scheme::Vapi => vapi::write(self, verified, body, headers),
            Scheme::Retell => retell::write(self, verified, body, headers),
            Scheme::ElevenLabs | Scheme::Stripe => {
                timestamped::write(self, verified, body, headers)
            }
            Scheme::StandardWebhooks => standard_webhooks::write(self, verified, body, headers),
            Scheme::Twilio => Err(VerifyError::CannotResign),
        }
    }

    /// What the sender's signature headers say (the header, id and timestamp), read without
    /// checking them: for re-signing a payload whose signature was verified when it arrived
    /// (a resend after a 413, a redelivery from the spool). `None` when no header is there.
    pub fn stamp(&self, headers: &HeaderMap) -> Option<Verified> {
        let (header, text) = read_header(headers, &self.header_names).ok()?;
        let (id, timestamp) = match self.scheme {
            Scheme::Retell => (None, retell::timestamp_of(text)),
            Scheme::ElevenLabs | Scheme::Stripe => (None, timestamped::timestamp_of(text)),
            Scheme::StandardWebhooks => standard_webhooks::id_and_timestamp(&header, headers)?,
            _ => (None, None),
        };
        if self.scheme.has_timestamp() && timestamp.is_none() {
            return None;
        }
        Some(Verified {
            header,
            id,
            timestamp,
        })
    }

    /// The headers the sender would send with `req.body` at `req.now` (the `sign` command;
    /// tests). `id` is the message id for schemes that sign one (a new one when `None`).
    pub fn sign_request(
        &self,
        req: &Signed<'_>,
        id: Option<String>,
    ) -> Result<HeaderMap, VerifyError> {
        let mut headers = HeaderMap::new();
        let since_epoch = req.now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let timestamp = match self.scheme {
            Scheme::Retell => Some(since_epoch.as_millis().to_string()),
            s if s.has_timestamp() => Some(since_epoch.as_secs().to_string()),
            _ => None,
        };
        let id = match self.scheme {
            Scheme::StandardWebhooks => {
                Some(id.unwrap_or_else(|| format!("msg_{}", uuid::Uuid::new_v4().simple())))
            }
            _ => id,
        };
        let stamp = Verified {
            header: self.header_names[0].clone(),
            id,
            timestamp,
        };
        match self.scheme {
            Scheme::Synthflow => {
                let call_id = req.call_id.ok_or(VerifyError::NoCallId)?;
                headers.insert(
                    stamp.header.clone(),
                    header_value(synthflow::sign(&self.secret, call_id)),
                );
            }
            Scheme::Twilio => twilio::write(self, &stamp, req, &mut headers)?,
            _ => self.resign(&stamp, req.body, &mut headers)?,
        }
        Ok(headers)
    }

    /// Signs a body for the receiver into this verifier's first header, in its encoding, with
    /// no prefix (`resign = { header, secret_env }`, an `hmac-sha256-body` verifier).
    pub fn sign(
        &self,
        call_id: Option<&str>,
        body: &[u8],
    ) -> Result<(HeaderName, HeaderValue), VerifyError> {
        let value = match self.scheme {
            Scheme::Synthflow => {
                synthflow::sign(&self.secret, call_id.ok_or(VerifyError::NoCallId)?)
            }
            Scheme::HmacSha256Body { encoding } => {
                encoding.encode(&self.secret.hmac_sha256(&[body]))
            }
            _ => return Err(VerifyError::CannotResign),
        };
        Ok((self.header_names[0].clone(), header_value(value)))
    }
}

/// The signature of `message` under `scheme`'s plain HMAC-SHA256 (the call id's bytes for
/// [`Scheme::Synthflow`], the body for [`Scheme::HmacSha256Body`]), with no prefix.
pub fn sign(scheme: Scheme, secret: &Secret, message: &[u8]) -> String {
    let tag = secret.hmac_sha256(&[message]);
    match scheme {
        Scheme::HmacSha256Body { encoding } => encoding.encode(&tag),
        Scheme::Synthflow => Encoding::Base64.encode(&tag),
        _ => Encoding::Hex.encode(&tag),
    }
}

/// The first configured header present, as trimmed visible ASCII; it must hold one value.
fn read_header<'h>(
    headers: &'h HeaderMap,
    names: &[HeaderName],
) -> Result<(HeaderName, &'h str), VerifyError> {
    let name = names
        .iter()
        .find(|name| headers.contains_key(*name))
        .ok_or(VerifyError::Missing)?;
    let mut values = headers.get_all(name).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(VerifyError::Malformed);
    };
    let text = value.to_str().map_err(|_| VerifyError::Malformed)?.trim();
    if text.len() > MAX_HEADER_CHARS {
        return Err(VerifyError::Malformed);
    }
    Ok((name.clone(), text))
}

/// Checks a signed timestamp (`units_per_sec`: 1 for seconds, 1000 for milliseconds) against
/// the clock, both ways.
fn check_timestamp(
    text: &str,
    units_per_sec: u64,
    now: SystemTime,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    let signed = parse_timestamp(text)?;
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .min(u64::MAX as u128) as u64;
    let signed_ms = signed.saturating_mul(1000 / units_per_sec);
    let tolerance_ms = tolerance.as_millis().min(u64::MAX as u128) as u64;
    if now.abs_diff(signed_ms) > tolerance_ms {
        return Err(VerifyError::Expired);
    }
    Ok(())
}

/// A decimal timestamp: digits only, at most 19 of them.
fn parse_timestamp(text: &str) -> Result<u64, VerifyError> {
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::Malformed);
    }
    text.parse().map_err(|_| VerifyError::Malformed)
}

/// Builds a header value from text this module produced (hex, base64, digits, ids checked on
/// the way in).
fn header_value(text: String) -> HeaderValue {
    HeaderValue::try_from(text).expect("signatures are visible ASCII, valid in a header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_names_round_trip() {
        for name in SCHEME_NAMES {
            let scheme = Scheme::from_config(name, None).unwrap();
            assert_eq!(scheme.as_str(), name);
        }
        assert_eq!(
            Scheme::from_config("hmac-sha1", None),
            Err(ConfigError::UnknownScheme("hmac-sha1".into()))
        );
        assert_eq!(
            Scheme::from_config("stripe", Some(Encoding::Hex)),
            Err(ConfigError::EncodingNotConfigurable("stripe"))
        );
        assert_eq!(
            "Hex".parse::<Encoding>(),
            Err(ConfigError::UnknownEncoding("Hex".into()))
        );
    }

    #[test]
    fn timestamps_both_ways() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let tol = Duration::from_secs(300);
        assert_eq!(check_timestamp("1700000000", 1, now, tol), Ok(()));
        assert_eq!(check_timestamp("1699999700", 1, now, tol), Ok(()));
        assert_eq!(
            check_timestamp("1699999699", 1, now, tol),
            Err(VerifyError::Expired)
        );
        assert_eq!(
            check_timestamp("1700000301", 1, now, tol),
            Err(VerifyError::Expired)
        );
        assert_eq!(check_timestamp("1700000300000", 1000, now, tol), Ok(()));
        assert_eq!(
            check_timestamp("1700000300001", 1000, now, tol),
            Err(VerifyError::Expired)
        );
        for bad in ["", "-1", "17e8", " 1", "99999999999999999999"] {
            assert_eq!(
                check_timestamp(bad, 1, now, tol),
                Err(VerifyError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn errors_name_no_secret_and_read_as_messages() {
        let errors = [
            VerifyError::Missing,
            VerifyError::Malformed,
            VerifyError::Mismatch,
            VerifyError::Expired,
            VerifyError::NoCallId,
            VerifyError::NoUrl,
            VerifyError::CannotResign,
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(
                !msg.ends_with('.') && msg.starts_with(char::is_lowercase),
                "{msg}"
            );
        }
        let debug = format!("{:?}", Secret::new("s3cr3t-value"));
        assert_eq!(debug, "Secret(***)");
    }

    #[test]
    fn stamps_read_what_resigning_keeps() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for scheme in [
            Scheme::Stripe,
            Scheme::Retell,
            Scheme::StandardWebhooks,
            Scheme::GitHub,
        ] {
            let secret = match scheme {
                Scheme::StandardWebhooks => Secret::new("whsec_c2VjcmV0"),
                _ => Secret::new("secret"),
            };
            let v = Verifier::new(scheme, None, secret).unwrap();
            let req = Signed {
                headers: &HeaderMap::new(),
                body: b"{}",
                call_id: None,
                url: None,
                now,
            };
            let headers = v.sign_request(&req, Some("msg_1".into())).unwrap();
            let verified = v
                .verify(&Signed {
                    headers: &headers,
                    ..req
                })
                .unwrap();
            assert_eq!(v.stamp(&headers), Some(verified), "{scheme:?}");
            assert_eq!(v.stamp(&HeaderMap::new()), None);
        }
    }

    #[test]
    fn configuration_errors() {
        let secret = || Secret::new("k");
        assert_eq!(
            Verifier::new(Scheme::Stripe, None, Secret::new("")).unwrap_err(),
            ConfigError::EmptySecret
        );
        assert_eq!(
            Verifier::new(
                Scheme::HmacSha256Body {
                    encoding: Encoding::Hex
                },
                None,
                secret()
            )
            .unwrap_err(),
            ConfigError::HeaderRequired
        );
        assert_eq!(
            Verifier::new(Scheme::StandardWebhooks, None, Secret::new("whsec_!!")).unwrap_err(),
            ConfigError::BadStandardWebhooksSecret
        );
        let v = Verifier::new(Scheme::Stripe, None, secret()).unwrap();
        assert_eq!(
            v.header_names(),
            [HeaderName::from_static("stripe-signature")]
        );
        assert_eq!(v.tolerance(), DEFAULT_TOLERANCE);
    }
}
