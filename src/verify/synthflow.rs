//! Synthflow: post-call webhooks carry HMAC-SHA256 over the `call.call_id` string (not the
//! body), base64-encoded. Synthflow documents the header as `HTTP_SYNTHFLOW_SIGNATURE`; on the
//! wire it is most likely `Synthflow-Signature`, so both spellings are read by default (header
//! names are case-insensitive). Trimming never changes `call.call_id`, so a trimmed body keeps
//! a valid signature and is never re-signed.

use http::HeaderName;

use super::{Encoding, Secret, Signed, TAG_BYTES, Verified, Verifier, VerifyError, read_header};

/// The header Synthflow most likely sends (`Synthflow-Signature`).
pub const SYNTHFLOW_SIGNATURE: HeaderName = HeaderName::from_static("synthflow-signature");

/// The spelling in Synthflow's documentation (`HTTP_SYNTHFLOW_SIGNATURE`), accepted as a literal
/// header name too. Proxies in front may drop it: nginx needs `underscores_in_headers on`.
pub const HTTP_SYNTHFLOW_SIGNATURE: HeaderName =
    HeaderName::from_static("http_synthflow_signature");

pub(super) fn verify(v: &Verifier, req: &Signed<'_>) -> Result<Verified, VerifyError> {
    let (header, text) = read_header(req.headers, &v.header_names)?;
    let provided: [u8; TAG_BYTES] = Encoding::Base64.decode(text)?;
    let call_id = req.call_id.ok_or(VerifyError::NoCallId)?;
    let expected = v.secret.hmac_sha256(&[call_id.as_bytes()]);
    if !super::tags_equal(&expected, &provided) {
        return Err(VerifyError::Mismatch);
    }
    Ok(Verified {
        header,
        id: Some(call_id.to_owned()),
        timestamp: None,
    })
}

/// The signature of a call id: base64 of HMAC-SHA256.
pub(super) fn sign(secret: &Secret, call_id: &str) -> String {
    Encoding::Base64.encode(&secret.hmac_sha256(&[call_id.as_bytes()]))
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use http::{HeaderMap, HeaderValue};

    use super::super::{Scheme, sign as sign_message};
    use super::*;

    // Independent vectors, computed once with OpenSSL 3 and pasted here:
    //
    //   K='whsec_7d1c0e5f2b9a'
    //   CID='c6f1e2a0-5b7d-4e1a-9f3c-2d8e4b6a1f09'
    //   printf '%s' "$CID"  | openssl dgst -sha256 -hmac "$K" -binary | base64
    const KEY: &str = "whsec_7d1c0e5f2b9a";
    const CALL_ID: &str = "c6f1e2a0-5b7d-4e1a-9f3c-2d8e4b6a1f09";
    const SYNTHFLOW_SIG: &str = "e18aq8yMFD0vgtBJMEojDvxmQviKWm9It+9147VAicY=";

    fn synthflow() -> Verifier {
        Verifier::new(Scheme::Synthflow, None, Secret::new(KEY)).unwrap()
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

    fn check(v: &Verifier, h: &HeaderMap, call_id: Option<&str>) -> Result<(), VerifyError> {
        v.verify(&Signed {
            headers: h,
            body: b"ignored",
            call_id,
            url: None,
            now: SystemTime::now(),
        })
        .map(|_| ())
    }

    #[test]
    fn sign_matches_openssl_vector() {
        assert_eq!(sign(&Secret::new(KEY), CALL_ID), SYNTHFLOW_SIG);
        assert_eq!(
            sign_message(Scheme::Synthflow, &Secret::new(KEY), CALL_ID.as_bytes()),
            SYNTHFLOW_SIG
        );
    }

    #[test]
    fn accepts_both_header_spellings_in_any_case() {
        let v = synthflow();
        for name in [
            "Synthflow-Signature",
            "synthflow-signature",
            "SYNTHFLOW-SIGNATURE",
            "HTTP_SYNTHFLOW_SIGNATURE",
            "http_synthflow_signature",
        ] {
            assert_eq!(
                check(&v, &headers(name, SYNTHFLOW_SIG), Some(CALL_ID)),
                Ok(()),
                "{name}"
            );
        }
    }

    #[test]
    fn signs_the_call_id_not_the_body() {
        let v = synthflow();
        let h = headers("Synthflow-Signature", SYNTHFLOW_SIG);
        assert_eq!(
            check(&v, &h, Some("c6f1e2a0-5b7d-4e1a-9f3c-2d8e4b6a1f0a")),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(check(&v, &h, None), Err(VerifyError::NoCallId));
        // Re-signing a trimmed body changes nothing.
        let verified = v
            .verify(&Signed {
                headers: &h,
                body: b"{}",
                call_id: Some(CALL_ID),
                url: None,
                now: SystemTime::now(),
            })
            .unwrap();
        let mut out = h.clone();
        v.resign(&verified, b"{\"trimmed\":true}", &mut out)
            .unwrap();
        assert_eq!(out, h);
    }

    #[test]
    fn missing_header_and_configured_header() {
        let v = synthflow();
        assert_eq!(
            check(&v, &HeaderMap::new(), Some(CALL_ID)),
            Err(VerifyError::Missing)
        );
        let h = headers("X-Signature", SYNTHFLOW_SIG);
        assert_eq!(check(&v, &h, Some(CALL_ID)), Err(VerifyError::Missing));
        let custom = Verifier::new(
            Scheme::Synthflow,
            Some(HeaderName::from_static("x-synthflow-sig")),
            Secret::new(KEY),
        )
        .unwrap();
        let h = headers("Synthflow-Signature", SYNTHFLOW_SIG);
        assert_eq!(check(&custom, &h, Some(CALL_ID)), Err(VerifyError::Missing));
        let h = headers("X-Synthflow-Sig", SYNTHFLOW_SIG);
        assert_eq!(check(&custom, &h, Some(CALL_ID)), Ok(()));
    }

    #[test]
    fn tampered_and_malformed() {
        let v = synthflow();
        for forged in [
            "f18aq8yMFD0vgtBJMEojDvxmQviKWm9It+9147VAicY=",
            "E18aq8yMFD0vgtBJMEojDvxmQviKWm9It+9147VAicY=",
        ] {
            let h = headers("Synthflow-Signature", forged);
            assert_eq!(check(&v, &h, Some(CALL_ID)), Err(VerifyError::Mismatch));
        }
        let other = Verifier::new(Scheme::Synthflow, None, Secret::new("whsec_other")).unwrap();
        let h = headers("Synthflow-Signature", SYNTHFLOW_SIG);
        assert_eq!(check(&other, &h, Some(CALL_ID)), Err(VerifyError::Mismatch));
        // Padding is optional; the URL-safe alphabet is not what Synthflow sends.
        let unpadded = SYNTHFLOW_SIG.trim_end_matches('=');
        assert_eq!(
            check(&v, &headers("Synthflow-Signature", unpadded), Some(CALL_ID)),
            Ok(())
        );
        let url_safe = SYNTHFLOW_SIG.replace('+', "-").replace('/', "_");
        assert_eq!(
            check(
                &v,
                &headers("Synthflow-Signature", &url_safe),
                Some(CALL_ID)
            ),
            Err(VerifyError::Malformed)
        );
        let too_long = format!("{SYNTHFLOW_SIG}{SYNTHFLOW_SIG}");
        for bad in ["", "not base64!", &SYNTHFLOW_SIG[..20], too_long.as_str()] {
            let h = headers("Synthflow-Signature", bad);
            assert_eq!(
                check(&v, &h, Some(CALL_ID)),
                Err(VerifyError::Malformed),
                "{bad:?}"
            );
        }
        let mut h = HeaderMap::new();
        h.insert(
            SYNTHFLOW_SIGNATURE,
            HeaderValue::from_bytes(b"e18aq8yM\xff").unwrap(),
        );
        assert_eq!(check(&v, &h, Some(CALL_ID)), Err(VerifyError::Malformed));
        // Repeated header; first configured header present wins.
        let mut h = headers("Synthflow-Signature", SYNTHFLOW_SIG);
        h.append(SYNTHFLOW_SIGNATURE, HeaderValue::from_static("guess"));
        assert_eq!(check(&v, &h, Some(CALL_ID)), Err(VerifyError::Malformed));
        let mut h = headers("Synthflow-Signature", "garbage");
        h.insert(
            HTTP_SYNTHFLOW_SIGNATURE,
            HeaderValue::from_static(SYNTHFLOW_SIG),
        );
        assert_eq!(check(&v, &h, Some(CALL_ID)), Err(VerifyError::Malformed));
    }

    #[test]
    fn debug_hides_the_secret() {
        let debug = format!("{:?}", synthflow());
        assert!(
            debug.contains("Secret(***)") && !debug.contains(KEY),
            "{debug}"
        );
    }
}
