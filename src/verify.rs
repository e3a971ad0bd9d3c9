//! Sender authentication: checks a request's HMAC-SHA256 signature before the body goes any
//! further, and signs bodies for the receiver when the proxy re-signs a trimmed payload.
//!
//! Two schemes:
//!
//! - [`Scheme::Synthflow`]: Synthflow's post-call webhooks carry HMAC-SHA256 over the
//!   `call.call_id` string (not the body), base64-encoded. Synthflow documents the header as
//!   `HTTP_SYNTHFLOW_SIGNATURE`; on the wire it is most likely `Synthflow-Signature`, so both
//!   spellings are read by default (header names are case-insensitive).
//! - [`Scheme::HmacSha256Body`]: HMAC-SHA256 over the whole body as received, hex or base64, in a
//!   configured header, with an optional `sha256=` prefix (GitHub style).
//!
//! Decoding is strict where it costs nothing: the signature must decode to exactly 32 bytes.
//! Base64 uses the standard alphabet (`+` and `/`); padding is optional, because a `=` is easily
//! lost by whoever copies a signature, and padding adds nothing to what is compared (the decoded
//! bytes, with non-canonical trailing bits refused). Hex is case-insensitive. Signatures are
//! compared in constant time. Nothing here ever prints the secret or the expected signature.
//!
//! Everything is pure: headers, call id and body in, a verdict out.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, Mac};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of an HMAC-SHA256 tag in bytes.
const TAG_BYTES: usize = 32;

/// Longest header value decoded as a signature (64 hex digits plus a `sha256=` prefix, with
/// room for stray whitespace); anything longer is malformed without being decoded.
const MAX_SIGNATURE_CHARS: usize = 96;

/// The header Synthflow most likely sends (`Synthflow-Signature`).
pub const SYNTHFLOW_SIGNATURE: HeaderName = HeaderName::from_static("synthflow-signature");

/// The spelling in Synthflow's documentation (`HTTP_SYNTHFLOW_SIGNATURE`), accepted as a literal
/// header name too. Proxies in front may drop it: nginx needs `underscores_in_headers on`.
pub const HTTP_SYNTHFLOW_SIGNATURE: HeaderName =
    HeaderName::from_static("http_synthflow_signature");

/// Standard alphabet; writes padding, reads it or its absence.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How a signature is written in its header.
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
}

impl Scheme {
    /// Builds a scheme from its configuration name (`synthflow` or `hmac-sha256-body`) and
    /// optional encoding. `hmac-sha256-body` defaults to hex; `synthflow` is always base64 and
    /// refuses an encoding.
    pub fn from_config(name: &str, encoding: Option<Encoding>) -> Result<Self, ConfigError> {
        match (name, encoding) {
            ("synthflow", None) => Ok(Scheme::Synthflow),
            ("synthflow", Some(_)) => Err(ConfigError::EncodingNotConfigurable),
            ("hmac-sha256-body", encoding) => Ok(Scheme::HmacSha256Body {
                encoding: encoding.unwrap_or(Encoding::Hex),
            }),
            (other, _) => Err(ConfigError::UnknownScheme(other.to_owned())),
        }
    }

    /// The configuration name: `synthflow` or `hmac-sha256-body`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Synthflow => "synthflow",
            Scheme::HmacSha256Body { .. } => "hmac-sha256-body",
        }
    }

    /// Whether the signed message is the `call.call_id` string, which the caller must extract
    /// from the JSON body and pass to [`Verifier::verify`].
    pub fn needs_call_id(self) -> bool {
        matches!(self, Scheme::Synthflow)
    }

    fn encoding(self) -> Encoding {
        match self {
            Scheme::Synthflow => Encoding::Base64,
            Scheme::HmacSha256Body { encoding } => encoding,
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

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length (longer ones are hashed); this never fails.
        <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why a request's signature was not accepted. Messages name no secret and no signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// None of the configured signature headers is present.
    #[error(
        "no signature header: the sender did not sign the request, or signed it into a header this route does not read"
    )]
    Missing,
    /// The signature header is repeated, not visible ASCII, or not 32 bytes in the expected
    /// encoding.
    #[error(
        "signature header is malformed: expected one value holding a 32-byte HMAC-SHA256 in the route's encoding"
    )]
    Malformed,
    /// The signature is well formed but wrong.
    #[error(
        "signature does not match: the request was signed with another secret, or the signed content changed"
    )]
    Mismatch,
    /// The scheme signs `call.call_id`, and the body has none.
    #[error("no call_id to verify the signature against: the body has no call.call_id string")]
    NoCallId,
}

impl VerifyError {
    /// Stable lowercase name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyError::Missing => "missing",
            VerifyError::Malformed => "malformed",
            VerifyError::Mismatch => "mismatch",
            VerifyError::NoCallId => "no_call_id",
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
    /// `hmac-sha256-body` without a header name.
    #[error("scheme hmac-sha256-body needs a header name, e.g. header = \"X-Signature\"")]
    HeaderRequired,
    /// An encoding was given for `synthflow`, which is always base64.
    #[error("scheme synthflow is always base64: remove the encoding")]
    EncodingNotConfigurable,
    /// Not `synthflow` or `hmac-sha256-body`.
    #[error("unknown signature scheme {0:?}: expected \"synthflow\" or \"hmac-sha256-body\"")]
    UnknownScheme(String),
    /// Not `hex` or `base64`.
    #[error("unknown signature encoding {0:?}: expected \"hex\" or \"base64\"")]
    UnknownEncoding(String),
}

/// Checks (and makes) one route's signatures: a scheme, the headers it is read from, a secret.
#[derive(Debug, Clone)]
pub struct Verifier {
    scheme: Scheme,
    header_names: Vec<HeaderName>,
    secret: Secret,
}

impl Verifier {
    /// Builds a verifier. `header` replaces the scheme's default headers: `synthflow` reads
    /// `Synthflow-Signature` and `HTTP_SYNTHFLOW_SIGNATURE` when it is `None`;
    /// `hmac-sha256-body` has no default and needs one.
    pub fn new(
        scheme: Scheme,
        header: Option<HeaderName>,
        secret: Secret,
    ) -> Result<Self, ConfigError> {
        if secret.is_empty() {
            return Err(ConfigError::EmptySecret);
        }
        let header_names = match (scheme, header) {
            (_, Some(name)) => vec![name],
            (Scheme::Synthflow, None) => vec![SYNTHFLOW_SIGNATURE, HTTP_SYNTHFLOW_SIGNATURE],
            (Scheme::HmacSha256Body { .. }, None) => return Err(ConfigError::HeaderRequired),
        };
        Ok(Verifier {
            scheme,
            header_names,
            secret,
        })
    }

    /// The scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The headers a signature is read from, in order of preference; [`Verifier::sign`] writes
    /// the first.
    pub fn header_names(&self) -> &[HeaderName] {
        &self.header_names
    }

    /// Checks the request's signature. `call_id` is the JSON-decoded `call.call_id` string of
    /// the body, needed by [`Scheme::Synthflow`] (see [`Scheme::needs_call_id`]); `body` is the
    /// body exactly as received, needed by [`Scheme::HmacSha256Body`].
    ///
    /// The first configured header present is read, and must hold exactly one value.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        call_id: Option<&str>,
        body: &[u8],
    ) -> Result<(), VerifyError> {
        let name = self
            .header_names
            .iter()
            .find(|name| headers.contains_key(*name))
            .ok_or(VerifyError::Missing)?;
        let mut values = headers.get_all(name).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(VerifyError::Malformed);
        };
        let provided = decode(self.scheme, value)?;
        let message = self.message(call_id, body)?;
        let mut mac = self.secret.mac();
        mac.update(message);
        // Constant-time comparison (hmac uses `subtle`).
        mac.verify_slice(&provided)
            .map_err(|_| VerifyError::Mismatch)
    }

    /// Signs a request for the receiver (the `resign` feature): the header to set, the first
    /// of [`Verifier::header_names`], and its value. [`Scheme::Synthflow`] signs the call id, so
    /// trimming the body does not change its signature; [`Scheme::HmacSha256Body`] signs the
    /// body as it will be sent, without a `sha256=` prefix.
    pub fn sign(
        &self,
        call_id: Option<&str>,
        body: &[u8],
    ) -> Result<(HeaderName, HeaderValue), VerifyError> {
        let message = self.message(call_id, body)?;
        let signature = sign(self.scheme, &self.secret, message);
        let value = HeaderValue::try_from(signature)
            .expect("hex and base64 are visible ASCII, valid in a header value");
        Ok((self.header_names[0].clone(), value))
    }

    fn message<'a>(
        &self,
        call_id: Option<&'a str>,
        body: &'a [u8],
    ) -> Result<&'a [u8], VerifyError> {
        match self.scheme {
            Scheme::Synthflow => call_id.map(str::as_bytes).ok_or(VerifyError::NoCallId),
            Scheme::HmacSha256Body { .. } => Ok(body),
        }
    }
}

/// The signature of `message` (the call id's bytes for [`Scheme::Synthflow`], the body for
/// [`Scheme::HmacSha256Body`]) in the scheme's encoding: padded base64 or lowercase hex, with no
/// prefix.
pub fn sign(scheme: Scheme, secret: &Secret, message: &[u8]) -> String {
    let mut mac = secret.mac();
    mac.update(message);
    let tag = mac.finalize().into_bytes();
    match scheme.encoding() {
        Encoding::Hex => hex::encode(tag),
        Encoding::Base64 => BASE64.encode(tag),
    }
}

/// Decodes a header value into the 32 tag bytes, or says it is malformed.
fn decode(scheme: Scheme, value: &HeaderValue) -> Result<[u8; TAG_BYTES], VerifyError> {
    let text = value.to_str().map_err(|_| VerifyError::Malformed)?.trim();
    if text.len() > MAX_SIGNATURE_CHARS {
        return Err(VerifyError::Malformed);
    }
    let text = match scheme {
        Scheme::Synthflow => text,
        Scheme::HmacSha256Body { .. } => strip_sha256_prefix(text),
    };
    let mut tag = [0u8; TAG_BYTES];
    match scheme.encoding() {
        Encoding::Hex => {
            hex::decode_to_slice(text, &mut tag).map_err(|_| VerifyError::Malformed)?;
        }
        Encoding::Base64 => {
            let bytes = BASE64.decode(text).map_err(|_| VerifyError::Malformed)?;
            tag = bytes.try_into().map_err(|_| VerifyError::Malformed)?;
        }
    }
    Ok(tag)
}

/// Drops a leading `sha256=` (any case), as GitHub writes `X-Hub-Signature-256`.
fn strip_sha256_prefix(text: &str) -> &str {
    const PREFIX: &str = "sha256=";
    match text.get(..PREFIX.len()) {
        Some(head) if head.eq_ignore_ascii_case(PREFIX) => &text[PREFIX.len()..],
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Independent vectors, computed once with OpenSSL 3 and pasted here:
    //
    //   K='whsec_7d1c0e5f2b9a'
    //   CID='c6f1e2a0-5b7d-4e1a-9f3c-2d8e4b6a1f09'
    //   BODY='{"status":"completed","call":{"call_id":"c6f1e2a0-5b7d-4e1a-9f3c-2d8e4b6a1f09","transcript":"bot: hi\nhuman: hello"}}'
    //   printf '%s' "$CID"  | openssl dgst -sha256 -hmac "$K" -binary | base64
    //   printf '%s' "$BODY" | openssl dgst -sha256 -hmac "$K"
    //   printf '%s' "$BODY" | openssl dgst -sha256 -hmac "$K" -binary | base64
    //
    // (`printf '%s'` keeps the body's `\n` as the two characters a JSON string escape has.)
    const KEY: &str = "whsec_7d1c0e5f2b9a";
    const CALL_ID: &str = "c6f1e2a0-5b7d-4e1a-9f3c-2d8e4b6a1f09";
    const BODY: &str = r#"{"status":"completed","call":{"call_id":"c6f1e2a0-5b7d-4e1a-9f3c-2d8e4b6a1f09","transcript":"bot: hi\nhuman: hello"}}"#;
    const SYNTHFLOW_SIG: &str = "e18aq8yMFD0vgtBJMEojDvxmQviKWm9It+9147VAicY=";
    const BODY_HEX: &str = "020ded98c85d478222edd2c47647b644137d8f4f95766f0670ca42f24949d3c0";
    const BODY_B64: &str = "Ag3tmMhdR4Ii7dLEdke2RBN9j0+Vdm8GcMpC8klJ08A=";

    const BODY_HEX_SCHEME: Scheme = Scheme::HmacSha256Body {
        encoding: Encoding::Hex,
    };
    const BODY_B64_SCHEME: Scheme = Scheme::HmacSha256Body {
        encoding: Encoding::Base64,
    };

    fn secret() -> Secret {
        Secret::new(KEY)
    }

    fn synthflow() -> Verifier {
        Verifier::new(Scheme::Synthflow, None, secret()).unwrap()
    }

    fn body_verifier(scheme: Scheme) -> Verifier {
        let header = HeaderName::from_static("x-signature");
        Verifier::new(scheme, Some(header), secret()).unwrap()
    }

    /// Headers with one entry, the name given in any case as a sender would write it.
    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
        h
    }

    #[test]
    fn sign_matches_openssl_vectors() {
        assert_eq!(
            sign(Scheme::Synthflow, &secret(), CALL_ID.as_bytes()),
            SYNTHFLOW_SIG
        );
        assert_eq!(sign(BODY_HEX_SCHEME, &secret(), BODY.as_bytes()), BODY_HEX);
        assert_eq!(sign(BODY_B64_SCHEME, &secret(), BODY.as_bytes()), BODY_B64);
    }

    #[test]
    fn sign_matches_rfc_4231_case_2() {
        // RFC 4231 section 4.3: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            sign(
                BODY_HEX_SCHEME,
                &Secret::new("Jefe"),
                b"what do ya want for nothing?"
            ),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn synthflow_accepts_both_header_spellings_in_any_case() {
        let v = synthflow();
        for name in [
            "Synthflow-Signature",
            "synthflow-signature",
            "SYNTHFLOW-SIGNATURE",
            "HTTP_SYNTHFLOW_SIGNATURE",
            "http_synthflow_signature",
        ] {
            let h = headers(name, SYNTHFLOW_SIG);
            assert_eq!(v.verify(&h, Some(CALL_ID), b"ignored"), Ok(()), "{name}");
        }
    }

    #[test]
    fn synthflow_signs_the_call_id_not_the_body() {
        let v = synthflow();
        let h = headers("Synthflow-Signature", SYNTHFLOW_SIG);
        assert_eq!(v.verify(&h, Some(CALL_ID), b"a trimmed body"), Ok(()));
        assert_eq!(
            v.verify(
                &h,
                Some("c6f1e2a0-5b7d-4e1a-9f3c-2d8e4b6a1f0a"),
                BODY.as_bytes()
            ),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            v.verify(&h, None, BODY.as_bytes()),
            Err(VerifyError::NoCallId)
        );
    }

    #[test]
    fn missing_header() {
        let v = synthflow();
        assert_eq!(
            v.verify(&HeaderMap::new(), Some(CALL_ID), b""),
            Err(VerifyError::Missing)
        );
        // Signed, but into a header the route does not read.
        let h = headers("X-Signature", SYNTHFLOW_SIG);
        assert_eq!(v.verify(&h, Some(CALL_ID), b""), Err(VerifyError::Missing));
        // A configured header replaces the defaults.
        let custom = Verifier::new(
            Scheme::Synthflow,
            Some(HeaderName::from_static("x-synthflow-sig")),
            secret(),
        )
        .unwrap();
        let h = headers("Synthflow-Signature", SYNTHFLOW_SIG);
        assert_eq!(
            custom.verify(&h, Some(CALL_ID), b""),
            Err(VerifyError::Missing)
        );
        let h = headers("X-Synthflow-Sig", SYNTHFLOW_SIG);
        assert_eq!(custom.verify(&h, Some(CALL_ID), b""), Ok(()));
    }

    #[test]
    fn tampered_signature_is_a_mismatch() {
        let v = synthflow();
        // Same length and alphabet, one character changed; base64 is case-sensitive.
        for forged in [
            "f18aq8yMFD0vgtBJMEojDvxmQviKWm9It+9147VAicY=",
            "E18aq8yMFD0vgtBJMEojDvxmQviKWm9It+9147VAicY=",
        ] {
            let h = headers("Synthflow-Signature", forged);
            assert_eq!(v.verify(&h, Some(CALL_ID), b""), Err(VerifyError::Mismatch));
        }
        let other_key = Verifier::new(Scheme::Synthflow, None, Secret::new("whsec_other")).unwrap();
        let h = headers("Synthflow-Signature", SYNTHFLOW_SIG);
        assert_eq!(
            other_key.verify(&h, Some(CALL_ID), b""),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn base64_padding_is_optional_and_the_alphabet_is_standard() {
        let v = synthflow();
        let unpadded = SYNTHFLOW_SIG.trim_end_matches('=');
        assert_eq!(
            v.verify(
                &headers("Synthflow-Signature", unpadded),
                Some(CALL_ID),
                b""
            ),
            Ok(())
        );
        // URL-safe alphabet ('-' for '+') is not what Synthflow sends.
        let url_safe = SYNTHFLOW_SIG.replace('+', "-").replace('/', "_");
        assert_eq!(
            v.verify(
                &headers("Synthflow-Signature", &url_safe),
                Some(CALL_ID),
                b""
            ),
            Err(VerifyError::Malformed)
        );
    }

    #[test]
    fn malformed_signatures() {
        let v = synthflow();
        let truncated = &SYNTHFLOW_SIG[..20];
        let too_long = format!("{SYNTHFLOW_SIG}{SYNTHFLOW_SIG}");
        for bad in ["", "not base64!", truncated, too_long.as_str(), BODY_HEX] {
            let h = headers("Synthflow-Signature", bad);
            assert_eq!(
                v.verify(&h, Some(CALL_ID), b""),
                Err(VerifyError::Malformed),
                "{bad:?}"
            );
        }
        // Bytes that are not visible ASCII.
        let mut h = HeaderMap::new();
        h.insert(
            SYNTHFLOW_SIGNATURE,
            HeaderValue::from_bytes(b"e18aq8yM\xff").unwrap(),
        );
        assert_eq!(
            v.verify(&h, Some(CALL_ID), b""),
            Err(VerifyError::Malformed)
        );
    }

    #[test]
    fn repeated_signature_header_is_malformed() {
        let v = synthflow();
        let mut h = headers("Synthflow-Signature", SYNTHFLOW_SIG);
        h.append(SYNTHFLOW_SIGNATURE, HeaderValue::from_static("guess"));
        assert_eq!(
            v.verify(&h, Some(CALL_ID), b""),
            Err(VerifyError::Malformed)
        );
    }

    #[test]
    fn first_configured_header_present_wins() {
        let v = synthflow();
        let mut h = headers("Synthflow-Signature", "garbage");
        h.insert(
            HTTP_SYNTHFLOW_SIGNATURE,
            HeaderValue::from_static(SYNTHFLOW_SIG),
        );
        assert_eq!(
            v.verify(&h, Some(CALL_ID), b""),
            Err(VerifyError::Malformed)
        );
    }

    #[test]
    fn body_hex_with_and_without_prefix_any_case() {
        let v = body_verifier(BODY_HEX_SCHEME);
        let upper = BODY_HEX.to_ascii_uppercase();
        for sig in [
            BODY_HEX.to_owned(),
            format!("sha256={BODY_HEX}"),
            format!("SHA256={BODY_HEX}"),
            upper.clone(),
            format!("sha256={upper}"),
        ] {
            let h = headers("X-Signature", &sig);
            assert_eq!(v.verify(&h, None, BODY.as_bytes()), Ok(()), "{sig}");
        }
        for bad in [format!("sha1={BODY_HEX}"), format!("sha256= {BODY_HEX}")] {
            let h = headers("X-Signature", &bad);
            assert_eq!(
                v.verify(&h, None, BODY.as_bytes()),
                Err(VerifyError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn body_base64_with_and_without_prefix() {
        let v = body_verifier(BODY_B64_SCHEME);
        for sig in [
            BODY_B64.to_owned(),
            BODY_B64.trim_end_matches('=').to_owned(),
            format!("sha256={BODY_B64}"),
        ] {
            let h = headers("x-signature", &sig);
            assert_eq!(v.verify(&h, None, BODY.as_bytes()), Ok(()), "{sig}");
        }
        // The hex signature is not valid for the base64 encoding.
        let h = headers("X-Signature", BODY_HEX);
        assert_eq!(
            v.verify(&h, None, BODY.as_bytes()),
            Err(VerifyError::Malformed)
        );
    }

    #[test]
    fn body_tampering_is_a_mismatch() {
        let v = body_verifier(BODY_HEX_SCHEME);
        let h = headers("X-Signature", BODY_HEX);
        let tampered = BODY.replace("hello", "hellp");
        assert_eq!(
            v.verify(&h, None, tampered.as_bytes()),
            Err(VerifyError::Mismatch)
        );
        let mut with_newline = BODY.as_bytes().to_vec();
        with_newline.push(b'\n');
        assert_eq!(
            v.verify(&h, None, &with_newline),
            Err(VerifyError::Mismatch)
        );
        // The body scheme ignores any call id.
        assert_eq!(v.verify(&h, Some(CALL_ID), BODY.as_bytes()), Ok(()));
    }

    #[test]
    fn resign_into_another_header_with_another_secret() {
        let trimmed = br#"{"call":{"call_id":"x","transcript":""}}"#;
        let downstream = Verifier::new(
            BODY_B64_SCHEME,
            Some(HeaderName::from_static("x-guard-signature")),
            Secret::new("receiver-secret"),
        )
        .unwrap();
        let (name, value) = downstream.sign(None, trimmed).unwrap();
        assert_eq!(name, "x-guard-signature");
        let mut h = HeaderMap::new();
        h.insert(name, value);
        assert_eq!(downstream.verify(&h, None, trimmed), Ok(()));
        assert_eq!(synthflow().sign(None, trimmed), Err(VerifyError::NoCallId));
        let (name, value) = synthflow().sign(Some(CALL_ID), trimmed).unwrap();
        assert_eq!(name, SYNTHFLOW_SIGNATURE);
        assert_eq!(value, SYNTHFLOW_SIG);
    }

    #[test]
    fn nothing_prints_the_secret_or_the_expected_signature() {
        let v = synthflow();
        let debug = format!("{v:?} {:?}", secret());
        assert!(debug.contains("Secret(***)"), "{debug}");
        assert!(!debug.contains(KEY), "{debug}");
        let errors = [
            VerifyError::Missing,
            VerifyError::Malformed,
            VerifyError::Mismatch,
            VerifyError::NoCallId,
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(!msg.contains(KEY) && !msg.contains(SYNTHFLOW_SIG) && !msg.contains(BODY_HEX));
            assert!(
                !msg.ends_with('.') && msg.starts_with(char::is_lowercase),
                "{msg}"
            );
        }
    }

    #[test]
    fn configuration_errors() {
        assert_eq!(
            Verifier::new(Scheme::Synthflow, None, Secret::new("")).unwrap_err(),
            ConfigError::EmptySecret
        );
        assert_eq!(
            Verifier::new(BODY_HEX_SCHEME, None, secret()).unwrap_err(),
            ConfigError::HeaderRequired
        );
        assert_eq!(
            Scheme::from_config("synthflow", None),
            Ok(Scheme::Synthflow)
        );
        assert_eq!(
            Scheme::from_config("hmac-sha256-body", None),
            Ok(BODY_HEX_SCHEME)
        );
        assert_eq!(
            Scheme::from_config("hmac-sha256-body", Some("base64".parse().unwrap())),
            Ok(BODY_B64_SCHEME)
        );
        assert_eq!(
            Scheme::from_config("synthflow", Some(Encoding::Hex)),
            Err(ConfigError::EncodingNotConfigurable)
        );
        assert_eq!(
            Scheme::from_config("hmac-sha1", None),
            Err(ConfigError::UnknownScheme("hmac-sha1".into()))
        );
        assert_eq!(
            "Hex".parse::<Encoding>(),
            Err(ConfigError::UnknownEncoding("Hex".into()))
        );
        for scheme in [Scheme::Synthflow, BODY_HEX_SCHEME] {
            let encoding = match scheme {
                Scheme::Synthflow => None,
                Scheme::HmacSha256Body { encoding } => Some(encoding),
            };
            assert_eq!(Scheme::from_config(scheme.as_str(), encoding), Ok(scheme));
        }
    }
}
