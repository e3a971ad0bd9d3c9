//! Standard Webhooks (the specification at standardwebhooks.com, used by Svix and others):
//! `webhook-id`, `webhook-timestamp` (unix seconds) and `webhook-signature`, a space-separated
//! list of `v1,<base64>` signatures (several while a secret is rotated), each HMAC-SHA256 of
//! `<id>.<timestamp>.<body>` keyed with the base64-decoded part of a `whsec_<base64>` secret.
//! Svix also sends the same values as `svix-id`, `svix-timestamp`, `svix-signature`; either set
//! is read (the `webhook-` set first). Other versions (`v1a,` asymmetric) are ignored.

use base64::Engine as _;
use http::{HeaderMap, HeaderName};

use super::{
    BASE64, ConfigError, Encoding, Secret, Signed, TAG_BYTES, Verified, Verifier, VerifyError,
    check_timestamp, header_value, read_header,
};

/// The specification's signature header.
pub const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");
/// Svix's spelling of it.
pub const SVIX_SIGNATURE: HeaderName = HeaderName::from_static("svix-signature");

/// Longest message id accepted (the ids are short; this bounds what is hashed and echoed).
const MAX_ID_CHARS: usize = 256;

/// Decodes `whsec_<base64>` (or bare base64) into the key bytes.
pub(super) fn decode_secret(secret: &Secret) -> Result<Secret, ConfigError> {
    let text =
        std::str::from_utf8(&secret.0).map_err(|_| ConfigError::BadStandardWebhooksSecret)?;
    let text = text.strip_prefix("whsec_").unwrap_or(text);
    let key = BASE64
        .decode(text)
        .map_err(|_| ConfigError::BadStandardWebhooksSecret)?;
    if key.is_empty() {
        return Err(ConfigError::BadStandardWebhooksSecret);
    }
    Ok(Secret::new(key))
}

/// The id and timestamp headers that go with a signature header.
fn companions(signature: &HeaderName) -> (HeaderName, HeaderName) {
    if *signature == SVIX_SIGNATURE {
        (
            HeaderName::from_static("svix-id"),
            HeaderName::from_static("svix-timestamp"),
        )
    } else {
        (
            HeaderName::from_static("webhook-id"),
            HeaderName::from_static("webhook-timestamp"),
        )
    }
}

pub(super) fn verify(v: &Verifier, req: &Signed<'_>) -> Result<Verified, VerifyError> {
    let (header, text) = read_header(req.headers, &v.header_names)?;
    let (id_name, ts_name) = companions(&header);
    let (_, id) = read_header(req.headers, std::slice::from_ref(&id_name))?;
    let (_, timestamp) = read_header(req.headers, std::slice::from_ref(&ts_name))?;
    if id.is_empty() || id.len() > MAX_ID_CHARS {
        return Err(VerifyError::Malformed);
    }
    super::parse_timestamp(timestamp)?;
    let expected =
        v.secret
            .hmac_sha256(&[id.as_bytes(), b".", timestamp.as_bytes(), b".", req.body]);
    let mut matched = false;
    let mut any = false;
    for entry in text.split(' ').filter(|e| !e.is_empty()) {
        let Some(("v1", signature)) = entry.split_once(',') else {
            continue;
        };
        any = true;
        if let Ok(provided) = Encoding::Base64.decode::<TAG_BYTES>(signature) {
            matched |= super::tags_equal(&expected, &provided);
        }
    }
    if !any {
        return Err(VerifyError::Malformed);
    }
    if !matched {
        return Err(VerifyError::Mismatch);
    }
    check_timestamp(timestamp, 1, req.now, v.tolerance)?;
    Ok(Verified {
        header,
        id: Some(id.to_owned()),
        timestamp: Some(timestamp.to_owned()),
    })
}

/// The id and timestamp headers that go with `signature`.
pub(super) fn id_and_timestamp(
    signature: &HeaderName,
    headers: &HeaderMap,
) -> Option<(Option<String>, Option<String>)> {
    let (id_name, ts_name) = companions(signature);
    let (_, id) = read_header(headers, std::slice::from_ref(&id_name)).ok()?;
    let (_, timestamp) = read_header(headers, std::slice::from_ref(&ts_name)).ok()?;
    super::parse_timestamp(timestamp).ok()?;
    Some((Some(id.to_owned()), Some(timestamp.to_owned())))
}

pub(super) fn write(
    v: &Verifier,
    stamp: &Verified,
    body: &[u8],
    headers: &mut HeaderMap,
) -> Result<(), VerifyError> {
    let id = stamp.id.as_deref().ok_or(VerifyError::Malformed)?;
    let timestamp = stamp.timestamp.as_deref().ok_or(VerifyError::Malformed)?;
    super::parse_timestamp(timestamp)?;
    let id_value = http::HeaderValue::from_str(id).map_err(|_| VerifyError::Malformed)?;
    let tag = v
        .secret
        .hmac_sha256(&[id.as_bytes(), b".", timestamp.as_bytes(), b".", body]);
    let (id_name, ts_name) = companions(&stamp.header);
    headers.insert(id_name, id_value);
    headers.insert(ts_name, header_value(timestamp.to_owned()));
    headers.insert(
        stamp.header.clone(),
        header_value(format!("v1,{}", Encoding::Base64.encode(&tag))),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use http::HeaderValue;

    use super::super::Scheme;
    use super::*;

    // The specification's reference vector (standard-webhooks libraries' "sign function works"
    // test; Svix's documentation): reproduced by `standardwebhooks` 1.1.0 from PyPI,
    // Webhook(SECRET).sign(ID, datetime.fromtimestamp(TS), BODY).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: u64 = 1614265330;
    const BODY: &str = r#"{"test": 2432232314}"#;
    const SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn verifier() -> Verifier {
        Verifier::new(Scheme::StandardWebhooks, None, Secret::new(SECRET)).unwrap()
    }

    fn headers(prefix: &str, id: &str, ts: &str, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in [("id", id), ("timestamp", ts), ("signature", sig)] {
            h.insert(
                HeaderName::from_bytes(format!("{prefix}-{name}").as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    fn check(h: &HeaderMap, body: &str, now: u64) -> Result<Verified, VerifyError> {
        verifier().verify(&Signed {
            headers: h,
            body: body.as_bytes(),
            call_id: None,
            url: None,
            now: UNIX_EPOCH + Duration::from_secs(now),
        })
    }

    #[test]
    fn reference_vector_both_header_sets() {
        for prefix in ["webhook", "svix"] {
            let h = headers(prefix, ID, &TS.to_string(), SIG);
            let verified = check(&h, BODY, TS).unwrap();
            assert_eq!(verified.id.as_deref(), Some(ID));
            let mut out = HeaderMap::new();
            verifier()
                .resign(&verified, BODY.as_bytes(), &mut out)
                .unwrap();
            assert_eq!(out, h, "{prefix}");
        }
    }

    #[test]
    fn rotation_lists_and_other_versions() {
        let zeros = format!("v1,{}", "A".repeat(43) + "=");
        for sig in [
            format!("{zeros} {SIG}"),
            format!("{SIG} {zeros}"),
            format!("v1a,c29tZXRoaW5n {SIG}"),
            format!("v1,bad {SIG}"),
        ] {
            let h = headers("webhook", ID, &TS.to_string(), &sig);
            assert!(check(&h, BODY, TS).is_ok(), "{sig}");
        }
        let h = headers("webhook", ID, &TS.to_string(), &zeros);
        assert_eq!(check(&h, BODY, TS), Err(VerifyError::Mismatch));
        let h = headers("webhook", ID, &TS.to_string(), "v1a,c29tZXRoaW5n");
        assert_eq!(check(&h, BODY, TS), Err(VerifyError::Malformed));
    }

    #[test]
    fn id_timestamp_and_body_are_signed() {
        let h = headers("webhook", "msg_other", &TS.to_string(), SIG);
        assert_eq!(check(&h, BODY, TS), Err(VerifyError::Mismatch));
        let h = headers("webhook", ID, &(TS + 1).to_string(), SIG);
        assert_eq!(check(&h, BODY, TS), Err(VerifyError::Mismatch));
        let h = headers("webhook", ID, &TS.to_string(), SIG);
        assert_eq!(
            check(&h, r#"{"test":2432232314}"#, TS),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(check(&h, BODY, TS + 301), Err(VerifyError::Expired));
        assert_eq!(check(&h, BODY, TS - 301), Err(VerifyError::Expired));
        let mut no_id = h.clone();
        no_id.remove("webhook-id");
        assert_eq!(check(&no_id, BODY, TS), Err(VerifyError::Missing));
    }

    #[test]
    fn secrets() {
        assert!(
            Verifier::new(
                Scheme::StandardWebhooks,
                None,
                Secret::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            )
            .is_ok()
        );
        for bad in ["whsec_", "whsec_not base64", "plain-text-secret!"] {
            assert_eq!(
                Verifier::new(Scheme::StandardWebhooks, None, Secret::new(bad)).unwrap_err(),
                ConfigError::BadStandardWebhooksSecret,
                "{bad}"
            );
        }
        let signed = verifier()
            .sign_request(
                &Signed {
                    headers: &HeaderMap::new(),
                    body: BODY.as_bytes(),
                    call_id: None,
                    url: None,
                    now: UNIX_EPOCH + Duration::from_secs(TS),
                },
                Some(ID.to_owned()),
            )
            .unwrap();
        assert_eq!(signed["webhook-signature"], SIG);
    }
}
