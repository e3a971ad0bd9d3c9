//! Stripe-style timestamped signatures: one header of comma-separated `key=value` items, a
//! timestamp `t=<unix seconds>` and one or more signatures, each HMAC-SHA256 of
//! `<t>.<body>`, hex. Several signatures (Stripe sends one per active secret while a secret is
//! rolled) are accepted when any matches.
//!
//! - Stripe: `Stripe-Signature: t=<s>,v1=<hex>[,v1=<hex>…]` (stripe-python
//!   `WebhookSignature.verify_header`; `v0=` items are test-mode signatures and ignored).
//! - ElevenLabs: `ElevenLabs-Signature: t=<s>,v0=<hex>` (elevenlabs-python
//!   `webhooks.construct_event`). The secret is used as its UTF-8 bytes (`whsec_…`, `wsec_…`
//!   included) by both.

use http::HeaderMap;

use super::{
    Encoding, Scheme, Signed, TAG_BYTES, Verified, Verifier, VerifyError, check_timestamp,
    header_value, read_header,
};

/// The item name the scheme's signatures use.
fn signature_key(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::ElevenLabs => "v0",
        _ => "v1",
    }
}

pub(super) fn verify(v: &Verifier, req: &Signed<'_>) -> Result<Verified, VerifyError> {
    let (header, text) = read_header(req.headers, &v.header_names)?;
    let key = signature_key(v.scheme);
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for item in text.split(',') {
        let (name, value) = item.trim().split_once('=').ok_or(VerifyError::Malformed)?;
        if name == "t" {
            if timestamp.replace(value).is_some() {
                return Err(VerifyError::Malformed);
            }
        } else if name == key {
            signatures.push(value);
        }
    }
    let timestamp = timestamp.ok_or(VerifyError::Malformed)?;
    if signatures.is_empty() {
        return Err(VerifyError::Malformed);
    }
    super::parse_timestamp(timestamp)?;
    let expected = v
        .secret
        .hmac_sha256(&[timestamp.as_bytes(), b".", req.body]);
    let mut matched = false;
    for signature in signatures {
        // A rotated signature may be of another length or garbage; only a match counts.
        if let Ok(provided) = Encoding::Hex.decode::<TAG_BYTES>(signature) {
            matched |= super::tags_equal(&expected, &provided);
        }
    }
    if !matched {
        return Err(VerifyError::Mismatch);
    }
    check_timestamp(timestamp, 1, req.now, v.tolerance)?;
    Ok(Verified {
        header,
        id: None,
        timestamp: Some(timestamp.to_owned()),
    })
}

/// The `t=` timestamp of a header value.
pub(super) fn timestamp_of(text: &str) -> Option<String> {
    let stamp = text
        .split(',')
        .find_map(|item| item.trim().strip_prefix("t="))?;
    super::parse_timestamp(stamp).ok()?;
    Some(stamp.to_owned())
}

pub(super) fn write(
    v: &Verifier,
    stamp: &Verified,
    body: &[u8],
    headers: &mut HeaderMap,
) -> Result<(), VerifyError> {
    let timestamp = stamp.timestamp.as_deref().ok_or(VerifyError::Malformed)?;
    super::parse_timestamp(timestamp)?;
    let tag = v.secret.hmac_sha256(&[timestamp.as_bytes(), b".", body]);
    let value = format!(
        "t={timestamp},{}={}",
        signature_key(v.scheme),
        hex::encode(tag)
    );
    headers.insert(stamp.header.clone(), header_value(value));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use http::{HeaderName, HeaderValue};

    use super::super::Secret;
    use super::*;

    // Stripe: computed with stripe-python 16.1.0,
    //   stripe.WebhookSignature._compute_signature("%d.%s" % (t, payload), secret)
    // and accepted by stripe.WebhookSignature.verify_header(payload, header, secret).
    const STRIPE_SECRET: &str = "whsec_test_secret_7d1c0e5f2b9a";
    const STRIPE_PAYLOAD: &str = "{\n  \"id\": \"evt_1PQRsTUvWxYz\",\n  \"object\": \"event\",\n  \"type\": \"invoice.paid\"\n}";
    const STRIPE_T: u64 = 1718000000;
    const STRIPE_V1: &str = "2ff90d05aa3d1e25dd683d2eee9315f5dbffd72e5ab612129583edd49b1e783e";

    // ElevenLabs: the algorithm of elevenlabs-python 2.78.0 `WebhooksClient.construct_event`
    // (HMAC-SHA256 of f"{t}.{body}", "v0=" + hexdigest); the header below is accepted by it.
    const EL_SECRET: &str = "wsec_4c1b0a9e8d7f6e5d4c3b2a1908f7e6d5";
    const EL_BODY: &str = r#"{"type":"post_call_transcription","event_timestamp":1739537297,"data":{"conversation_id":"conv_01jkx3a5b6c7d8e9f0g1h2j3k4"}}"#;
    const EL_T: u64 = 1739537297;
    const EL_V0: &str = "7ddb7a0d9b3a66150ec171b8f7cdfd387080fb89531ea713f303415a3da76007";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn stripe() -> Verifier {
        Verifier::new(Scheme::Stripe, None, Secret::new(STRIPE_SECRET)).unwrap()
    }

    fn check(
        v: &Verifier,
        name: &'static str,
        header: &str,
        body: &str,
        now: SystemTime,
    ) -> Result<Verified, VerifyError> {
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(header).unwrap(),
        );
        v.verify(&Signed {
            headers: &h,
            body: body.as_bytes(),
            call_id: None,
            url: None,
            now,
        })
    }

    #[test]
    fn stripe_sdk_vector() {
        let header = format!("t={STRIPE_T},v1={STRIPE_V1}");
        let v = stripe();
        let verified = check(
            &v,
            "stripe-signature",
            &header,
            STRIPE_PAYLOAD,
            at(STRIPE_T + 10),
        )
        .unwrap();
        assert_eq!(verified.timestamp.as_deref(), Some("1718000000"));
        // Re-signing the same body reproduces the sender's header exactly.
        let mut out = HeaderMap::new();
        v.resign(&verified, STRIPE_PAYLOAD.as_bytes(), &mut out)
            .unwrap();
        assert_eq!(out["stripe-signature"], header.as_str());
    }

    #[test]
    fn stripe_rotation_and_test_mode_items() {
        let v = stripe();
        let now = at(STRIPE_T);
        let zeros = "0".repeat(64);
        for header in [
            format!("t={STRIPE_T},v1={zeros},v1={STRIPE_V1}"),
            format!("t={STRIPE_T},v1={STRIPE_V1},v1={zeros}"),
            format!("v1=short, t={STRIPE_T}, v0={zeros}, v1={STRIPE_V1}"),
        ] {
            assert!(
                check(&v, "stripe-signature", &header, STRIPE_PAYLOAD, now).is_ok(),
                "{header}"
            );
        }
        let only_wrong = format!("t={STRIPE_T},v1={zeros},v0={STRIPE_V1}");
        assert_eq!(
            check(&v, "stripe-signature", &only_wrong, STRIPE_PAYLOAD, now),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn stripe_stale_future_and_malformed() {
        let v = stripe();
        let header = format!("t={STRIPE_T},v1={STRIPE_V1}");
        let late = at(STRIPE_T + 301);
        assert_eq!(
            check(&v, "stripe-signature", &header, STRIPE_PAYLOAD, late),
            Err(VerifyError::Expired)
        );
        let early = at(STRIPE_T - 301);
        assert_eq!(
            check(&v, "stripe-signature", &header, STRIPE_PAYLOAD, early),
            Err(VerifyError::Expired)
        );
        let lenient = stripe().with_tolerance(Duration::from_secs(3600));
        assert!(check(&lenient, "stripe-signature", &header, STRIPE_PAYLOAD, late).is_ok());
        // A tampered timestamp no longer matches.
        let moved = format!("t={},v1={STRIPE_V1}", STRIPE_T + 1);
        assert_eq!(
            check(&v, "stripe-signature", &moved, STRIPE_PAYLOAD, at(STRIPE_T)),
            Err(VerifyError::Mismatch)
        );
        for bad in [
            format!("v1={STRIPE_V1}"),
            format!("t={STRIPE_T}"),
            format!("t=soon,v1={STRIPE_V1}"),
            format!("t={STRIPE_T},t={STRIPE_T},v1={STRIPE_V1}"),
            format!("t={STRIPE_T};v1={STRIPE_V1}"),
        ] {
            assert_eq!(
                check(&v, "stripe-signature", &bad, STRIPE_PAYLOAD, at(STRIPE_T)),
                Err(VerifyError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn elevenlabs_sdk_vector() {
        let v = Verifier::new(Scheme::ElevenLabs, None, Secret::new(EL_SECRET)).unwrap();
        let header = format!("t={EL_T},v0={EL_V0}");
        let verified = check(&v, "elevenlabs-signature", &header, EL_BODY, at(EL_T + 60)).unwrap();
        let mut out = HeaderMap::new();
        v.resign(&verified, EL_BODY.as_bytes(), &mut out).unwrap();
        assert_eq!(out["elevenlabs-signature"], header.as_str());
        // v1 items are Stripe's, not ElevenLabs'.
        let wrong_key = format!("t={EL_T},v1={EL_V0}");
        assert_eq!(
            check(&v, "elevenlabs-signature", &wrong_key, EL_BODY, at(EL_T)),
            Err(VerifyError::Malformed)
        );
        assert_eq!(
            check(&v, "elevenlabs-signature", &header, EL_BODY, at(EL_T + 301)),
            Err(VerifyError::Expired)
        );
        assert_eq!(
            check(&v, "elevenlabs-signature", &header, "{}", at(EL_T)),
            Err(VerifyError::Mismatch)
        );
    }
}
