//! Vapi server URLs authenticate in one of two ways (Vapi, "Server authentication"): an HMAC
//! credential, whose signature is HMAC-SHA256 of the body, hex, in `X-Vapi-Signature` (the
//! header name is configurable in Vapi, and here with `header`); or the older shared secret,
//! sent as is in `X-Vapi-Secret` and compared in constant time. The shared secret does not
//! cover the body, so a trimmed body keeps it valid; an HMAC is re-signed.

use http::{HeaderMap, HeaderName};

use super::{
    Encoding, Signed, TAG_BYTES, Verified, Verifier, VerifyError, header_value, read_header,
};

/// The HMAC credential's default signature header.
pub const X_VAPI_SIGNATURE: HeaderName = HeaderName::from_static("x-vapi-signature");
/// The shared-secret header.
pub const X_VAPI_SECRET: HeaderName = HeaderName::from_static("x-vapi-secret");

pub(super) fn verify(v: &Verifier, req: &Signed<'_>) -> Result<Verified, VerifyError> {
    let (header, text) = read_header(req.headers, &v.header_names)?;
    if header == X_VAPI_SECRET {
        if !v.secret.matches(text.as_bytes()) {
            return Err(VerifyError::Mismatch);
        }
    } else {
        let provided: [u8; TAG_BYTES] = Encoding::Hex.decode(text)?;
        let expected = v.secret.hmac_sha256(&[req.body]);
        if !super::tags_equal(&expected, &provided) {
            return Err(VerifyError::Mismatch);
        }
    }
    Ok(Verified {
        header,
        id: None,
        timestamp: None,
    })
}

pub(super) fn write(
    v: &Verifier,
    stamp: &Verified,
    body: &[u8],
    headers: &mut HeaderMap,
) -> Result<(), VerifyError> {
    if stamp.header == X_VAPI_SECRET {
        // The shared secret covers no content; it passes unchanged.
        return Ok(());
    }
    let tag = v.secret.hmac_sha256(&[body]);
    headers.insert(stamp.header.clone(), header_value(hex::encode(tag)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use http::HeaderValue;

    use super::super::{Scheme, Secret};
    use super::*;

    // Vapi's HMAC credential with Algorithm SHA256, signature encoding hex and payload format
    // "{body}": HMAC-SHA256(secret, body), hex. Independent vector, computed once with OpenSSL 3:
    //   printf '%s' '{"message":{"type":"end-of-call-report"}}' \
    //     | openssl dgst -sha256 -hmac 'vapi-hmac-secret'
    const SECRET: &str = "vapi-hmac-secret";
    const BODY: &str = r#"{"message":{"type":"end-of-call-report"}}"#;
    const SIG: &str = "7d4df2567ebb7b748c59b5edf52c1f9b3e3ca309e1052e406514dbcf5539cac8";

    fn check(h: &HeaderMap, body: &str) -> Result<Verified, VerifyError> {
        let v = Verifier::new(Scheme::Vapi, None, Secret::new(SECRET)).unwrap();
        v.verify(&Signed {
            headers: h,
            body: body.as_bytes(),
            call_id: None,
            url: None,
            now: SystemTime::now(),
        })
    }

    fn headers(name: HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn hmac_signature() {
        let h = headers(X_VAPI_SIGNATURE, SIG);
        let verified = check(&h, BODY).unwrap();
        assert_eq!(check(&h, "{}"), Err(VerifyError::Mismatch));
        let v = Verifier::new(Scheme::Vapi, None, Secret::new(SECRET)).unwrap();
        let mut out = h.clone();
        v.resign(&verified, b"{}", &mut out).unwrap();
        assert!(check(&out, "{}").is_ok());
        assert_ne!(out, h);
    }

    #[test]
    fn shared_secret() {
        let h = headers(X_VAPI_SECRET, SECRET);
        let verified = check(&h, BODY).unwrap();
        assert!(
            check(&h, "{}").is_ok(),
            "the shared secret does not cover the body"
        );
        assert_eq!(
            check(&headers(X_VAPI_SECRET, "vapi-hmac-secreT"), BODY),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(check(&HeaderMap::new(), BODY), Err(VerifyError::Missing));
        let v = Verifier::new(Scheme::Vapi, None, Secret::new(SECRET)).unwrap();
        let mut out = h.clone();
        v.resign(&verified, b"{}", &mut out).unwrap();
        assert_eq!(out, h);
    }
}
