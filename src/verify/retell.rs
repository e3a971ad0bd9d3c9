//! Retell AI: `X-Retell-Signature: v=<unix milliseconds>,d=<hex>`, where the digest is
//! HMAC-SHA256 keyed with the Retell API key over the raw body followed by the timestamp's
//! decimal digits (no separator), and the timestamp must be within five minutes of the clock
//! either way (retell-python-sdk `retell/lib/webhook_auth.py`, `verify`).

use http::HeaderMap;

use super::{
    Encoding, Signed, TAG_BYTES, Verified, Verifier, VerifyError, check_timestamp, header_value,
    read_header,
};

pub(super) fn verify(v: &Verifier, req: &Signed<'_>) -> Result<Verified, VerifyError> {
    let (header, text) = read_header(req.headers, &v.header_names)?;
    let (stamp, digest) = text
        .strip_prefix("v=")
        .and_then(|rest| rest.split_once(",d="))
        .ok_or(VerifyError::Malformed)?;
    super::parse_timestamp(stamp)?;
    let provided: [u8; TAG_BYTES] = Encoding::Hex.decode(digest)?;
    let expected = v.secret.hmac_sha256(&[req.body, stamp.as_bytes()]);
    if !super::tags_equal(&expected, &provided) {
        return Err(VerifyError::Mismatch);
    }
    check_timestamp(stamp, 1000, req.now, v.tolerance)?;
    Ok(Verified {
        header,
        id: None,
        timestamp: Some(stamp.to_owned()),
    })
}

/// The `v=` timestamp of a header value.
pub(super) fn timestamp_of(text: &str) -> Option<String> {
    let (stamp, _) = text.strip_prefix("v=")?.split_once(",d=")?;
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
    let tag = v.secret.hmac_sha256(&[body, timestamp.as_bytes()]);
    let value = format!("v={timestamp},d={}", hex::encode(tag));
    headers.insert(stamp.header.clone(), header_value(value));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use http::{HeaderName, HeaderValue};

    use super::super::{Scheme, Secret};
    use super::*;

    // The digest of retell-python-sdk's verifier (hmac.new(api_key, body + str(ts), sha256)),
    // computed once in Python; `retell.lib.webhook_auth.symmetric["verify"](body, key, sig,
    // {"timestamp": ts + 1000})` from retell-sdk on PyPI returns True for it.
    const KEY: &str = "key_7d1c0e5f2b9a4c3e8f01";
    const BODY: &str =
        r#"{"event":"call_ended","call":{"call_id":"Jabr9TXYYJHfvl6Syypi88rdAHYHmcq6"}}"#;
    const TS_MS: u64 = 1714608475945;
    const SIG: &str =
        "v=1714608475945,d=0fe33bbe5081dd55e6206e76aaa306888d5b045736fc15189bafa5a0785c7bd7";

    fn check(header: &str, body: &str, now_ms: u64) -> Result<Verified, VerifyError> {
        let v = Verifier::new(Scheme::Retell, None, Secret::new(KEY)).unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_static("x-retell-signature"),
            HeaderValue::from_str(header).unwrap(),
        );
        v.verify(&Signed {
            headers: &h,
            body: body.as_bytes(),
            call_id: None,
            url: None,
            now: UNIX_EPOCH + Duration::from_millis(now_ms),
        })
    }

    #[test]
    fn sdk_vector_and_resign() {
        let verified = check(SIG, BODY, TS_MS + 1000).unwrap();
        assert_eq!(verified.timestamp.as_deref(), Some("1714608475945"));
        let v = Verifier::new(Scheme::Retell, None, Secret::new(KEY)).unwrap();
        let mut out = HeaderMap::new();
        v.resign(&verified, BODY.as_bytes(), &mut out).unwrap();
        assert_eq!(out["x-retell-signature"], SIG);
        let mut trimmed = HeaderMap::new();
        v.resign(&verified, b"{}", &mut trimmed).unwrap();
        let resigned = trimmed["x-retell-signature"].to_str().unwrap();
        assert!(check(resigned, "{}", TS_MS).is_ok());
    }

    #[test]
    fn five_minutes_either_way() {
        assert!(check(SIG, BODY, TS_MS + 300_000).is_ok());
        assert!(check(SIG, BODY, TS_MS - 300_000).is_ok());
        assert_eq!(check(SIG, BODY, TS_MS + 300_001), Err(VerifyError::Expired));
        assert_eq!(check(SIG, BODY, TS_MS - 300_001), Err(VerifyError::Expired));
    }

    #[test]
    fn mismatch_and_malformed() {
        assert_eq!(check(SIG, "{}", TS_MS), Err(VerifyError::Mismatch));
        let moved = SIG.replace("945,", "946,");
        assert_eq!(check(&moved, BODY, TS_MS), Err(VerifyError::Mismatch));
        for bad in [
            "d=0fe3,v=1714608475945",
            "v=,d=0fe33bbe5081dd55e6206e76aaa306888d5b045736fc15189bafa5a0785c7bd7",
            "v=1714608475945",
            "0fe33bbe5081dd55e6206e76aaa306888d5b045736fc15189bafa5a0785c7bd7",
            "v=1714608475945,d=zz",
        ] {
            assert_eq!(
                check(bad, BODY, TS_MS),
                Err(VerifyError::Malformed),
                "{bad}"
            );
        }
    }
}
