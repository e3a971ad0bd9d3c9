//! Whole-body HMAC-SHA256 with no timestamp: the generic `hmac-sha256-body` (a configured
//! header, hex or base64, an optional `sha256=` prefix) and GitHub's `X-Hub-Signature-256:
//! sha256=<hex>` (GitHub, "Validating webhook deliveries"). The delivery id GitHub sends in
//! `X-GitHub-Delivery` is kept as the id. Re-signing GitHub also writes the legacy
//! `X-Hub-Signature: sha1=<hex>` GitHub sends alongside, so it never goes out stale.

use http::{HeaderMap, HeaderName};

use super::{
    Encoding, Scheme, Signed, TAG_BYTES, Verified, Verifier, VerifyError, header_value, read_header,
};

/// GitHub's unique delivery id.
const X_GITHUB_DELIVERY: HeaderName = HeaderName::from_static("x-github-delivery");
/// GitHub's legacy HMAC-SHA1 header.
const X_HUB_SIGNATURE: HeaderName = HeaderName::from_static("x-hub-signature");

pub(super) fn verify(v: &Verifier, req: &Signed<'_>) -> Result<Verified, VerifyError> {
    let (header, text) = read_header(req.headers, &v.header_names)?;
    let (encoding, text) = match v.scheme {
        Scheme::HmacSha256Body { encoding } => (encoding, strip_sha256_prefix(text)),
        // GitHub always writes the prefix.
        _ => (
            Encoding::Hex,
            text.strip_prefix("sha256=").ok_or(VerifyError::Malformed)?,
        ),
    };
    let provided: [u8; TAG_BYTES] = encoding.decode(text)?;
    let expected = v.secret.hmac_sha256(&[req.body]);
    if !super::tags_equal(&expected, &provided) {
        return Err(VerifyError::Mismatch);
    }
    let id = match v.scheme {
        Scheme::GitHub => req
            .headers
            .get(X_GITHUB_DELIVERY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        _ => None,
    };
    Ok(Verified {
        header,
        id,
        timestamp: None,
    })
}

pub(super) fn write(
    v: &Verifier,
    stamp: &Verified,
    body: &[u8],
    headers: &mut HeaderMap,
) -> Result<(), VerifyError> {
    let tag = v.secret.hmac_sha256(&[body]);
    let value = match v.scheme {
        Scheme::HmacSha256Body { encoding } => encoding.encode(&tag),
        _ => {
            // GitHub sends both; the legacy one must not go out stale.
            let sha1 = hex::encode(v.secret.hmac_sha1(&[body]));
            headers.insert(X_HUB_SIGNATURE, header_value(format!("sha1={sha1}")));
            format!("sha256={}", hex::encode(tag))
        }
    };
    headers.insert(stamp.header.clone(), header_value(value));
    Ok(())
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
    use std::time::SystemTime;

    use http::HeaderValue;

    use super::super::{Secret, sign};
    use super::*;

    // Independent vectors, computed once with OpenSSL 3 and pasted here:
    //
    //   K='whsec_7d1c0e5f2b9a'
    //   BODY='{"status":"completed","call":{"call_id":"c6f1e2a0-5b7d-4e1a-9f3c-2d8e4b6a1f09","transcript":"bot: hi\nhuman: hello"}}'
    //   printf '%s' "$BODY" | openssl dgst -sha256 -hmac "$K"
    //   printf '%s' "$BODY" | openssl dgst -sha256 -hmac "$K" -binary | base64
    const KEY: &str = "whsec_7d1c0e5f2b9a";
    const BODY: &str = r#"{"status":"completed","call":{"call_id":"c6f1e2a0-5b7d-4e1a-9f3c-2d8e4b6a1f09","transcript":"bot: hi\nhuman: hello"}}"#;
    const BODY_HEX: &str = "020ded98c85d478222edd2c47647b644137d8f4f95766f0670ca42f24949d3c0";
    const BODY_B64: &str = "Ag3tmMhdR4Ii7dLEdke2RBN9j0+Vdm8GcMpC8klJ08A=";

    // GitHub's documentation ("Validating webhook deliveries", "Testing the webhook payload
    // validation"): secret "It's a Secret to Everybody", payload "Hello, World!".
    const GITHUB_SECRET: &str = "It's a Secret to Everybody";
    const GITHUB_PAYLOAD: &str = "Hello, World!";
    const GITHUB_SIG: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    const HEX: Scheme = Scheme::HmacSha256Body {
        encoding: Encoding::Hex,
    };
    const B64: Scheme = Scheme::HmacSha256Body {
        encoding: Encoding::Base64,
    };

    fn verifier(scheme: Scheme) -> Verifier {
        let header = HeaderName::from_static("x-signature");
        Verifier::new(scheme, Some(header), Secret::new(KEY)).unwrap()
    }

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
        h
    }

    fn check(v: &Verifier, h: &HeaderMap, body: &[u8]) -> Result<Verified, VerifyError> {
        v.verify(&Signed {
            headers: h,
            body,
            call_id: None,
            url: None,
            now: SystemTime::now(),
        })
    }

    #[test]
    fn vectors() {
        assert_eq!(sign(HEX, &Secret::new(KEY), BODY.as_bytes()), BODY_HEX);
        assert_eq!(sign(B64, &Secret::new(KEY), BODY.as_bytes()), BODY_B64);
        // RFC 4231 section 4.3: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            sign(HEX, &Secret::new("Jefe"), b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn github_documentation_vector() {
        let v = Verifier::new(Scheme::GitHub, None, Secret::new(GITHUB_SECRET)).unwrap();
        let mut h = headers("X-Hub-Signature-256", GITHUB_SIG);
        h.insert(
            X_GITHUB_DELIVERY,
            HeaderValue::from_static("72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        );
        let verified = check(&v, &h, GITHUB_PAYLOAD.as_bytes()).unwrap();
        assert_eq!(
            verified.id.as_deref(),
            Some("72d3162e-cc78-11e3-81ab-4c9367dc0958")
        );
        // GitHub always writes the prefix.
        let bare = headers("X-Hub-Signature-256", &GITHUB_SIG[7..]);
        assert_eq!(
            check(&v, &bare, GITHUB_PAYLOAD.as_bytes()),
            Err(VerifyError::Malformed)
        );
        assert_eq!(check(&v, &h, b"Hello, World?"), Err(VerifyError::Mismatch));
        // Re-signing writes the same layout, and refreshes the legacy SHA-1 header.
        let mut out = h.clone();
        out.insert(X_HUB_SIGNATURE, HeaderValue::from_static("sha1=stale"));
        v.resign(&verified, GITHUB_PAYLOAD.as_bytes(), &mut out)
            .unwrap();
        assert_eq!(out["x-hub-signature-256"], GITHUB_SIG);
        // printf 'Hello, World!' | openssl dgst -sha1 -hmac "It's a Secret to Everybody"
        assert_eq!(
            out["x-hub-signature"],
            "sha1=01dc10d0c83e72ed246219cdd91669667fe2ca59"
        );
    }

    #[test]
    fn hex_with_and_without_prefix_any_case() {
        let v = verifier(HEX);
        let upper = BODY_HEX.to_ascii_uppercase();
        for sig in [
            BODY_HEX.to_owned(),
            format!("sha256={BODY_HEX}"),
            format!("SHA256={BODY_HEX}"),
            upper.clone(),
            format!("sha256={upper}"),
        ] {
            assert!(
                check(&v, &headers("X-Signature", &sig), BODY.as_bytes()).is_ok(),
                "{sig}"
            );
        }
        for bad in [format!("sha1={BODY_HEX}"), format!("sha256= {BODY_HEX}")] {
            assert_eq!(
                check(&v, &headers("X-Signature", &bad), BODY.as_bytes()),
                Err(VerifyError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn base64_with_and_without_prefix() {
        let v = verifier(B64);
        for sig in [
            BODY_B64.to_owned(),
            BODY_B64.trim_end_matches('=').to_owned(),
            format!("sha256={BODY_B64}"),
        ] {
            assert!(
                check(&v, &headers("x-signature", &sig), BODY.as_bytes()).is_ok(),
                "{sig}"
            );
        }
        assert_eq!(
            check(&v, &headers("X-Signature", BODY_HEX), BODY.as_bytes()),
            Err(VerifyError::Malformed)
        );
    }

    #[test]
    fn tampering_is_a_mismatch() {
        let v = verifier(HEX);
        let h = headers("X-Signature", BODY_HEX);
        let tampered = BODY.replace("hello", "hellp");
        assert_eq!(
            check(&v, &h, tampered.as_bytes()),
            Err(VerifyError::Mismatch)
        );
        let mut with_newline = BODY.as_bytes().to_vec();
        with_newline.push(b'\n');
        assert_eq!(check(&v, &h, &with_newline), Err(VerifyError::Mismatch));
    }

    #[test]
    fn resign_same_and_into_another_header() {
        let v = verifier(HEX);
        let h = headers("X-Signature", BODY_HEX);
        let verified = check(&v, &h, BODY.as_bytes()).unwrap();
        let trimmed = br#"{"call":{"call_id":"x","transcript":""}}"#;
        let mut out = h.clone();
        v.resign(&verified, trimmed, &mut out).unwrap();
        assert!(check(&v, &out, trimmed).is_ok());
        assert_eq!(check(&v, &out, BODY.as_bytes()), Err(VerifyError::Mismatch));

        let downstream = Verifier::new(
            B64,
            Some(HeaderName::from_static("x-guard-signature")),
            Secret::new("receiver-secret"),
        )
        .unwrap();
        let (name, value) = downstream.sign(None, trimmed).unwrap();
        assert_eq!(name, "x-guard-signature");
        let mut h = HeaderMap::new();
        h.insert(name, value);
        assert!(check(&downstream, &h, trimmed).is_ok());
    }
}
