//! Twilio: `X-Twilio-Signature` is base64 of HMAC-SHA1, keyed with the account's auth token,
//! over the full URL Twilio called (scheme, host, path, query) followed by every POST form
//! parameter as `name` + `value`, sorted (twilio-python `RequestValidator`). For JSON bodies the
//! URL carries a `bodySHA256` query parameter (hex SHA-256 of the body) and only the URL is
//! signed. The URL is the one the sender saw, which a proxy cannot know from the request: the
//! route's `public_url` provides it. As in the SDK, the URL is tried with and without its
//! default port. No timestamp: Twilio signatures can be replayed within the same URL and
//! parameters, so receivers dedupe on `CallSid`/`MessageSid`.
//!
//! The signature covers the URL and parameters, not bytes the proxy can re-sign: a route that
//! trims Twilio payloads cannot use `resign = "same"`.

use base64::Engine as _;
use http::{HeaderMap, Uri};
use sha2::{Digest, Sha256};

use super::{BASE64, Signed, Verified, Verifier, VerifyError, header_value, read_header};

/// Length of an HMAC-SHA1 tag in bytes.
const SHA1_TAG_BYTES: usize = 20;

pub(super) fn verify(v: &Verifier, req: &Signed<'_>) -> Result<Verified, VerifyError> {
    let (header, text) = read_header(req.headers, &v.header_names)?;
    let url = req.url.ok_or(VerifyError::NoUrl)?;
    let provided = BASE64.decode(text).map_err(|_| VerifyError::Malformed)?;
    if provided.len() != SHA1_TAG_BYTES {
        return Err(VerifyError::Malformed);
    }
    let params = signed_params(url, req.body)?;
    let mut matched = false;
    for candidate in url_variants(url) {
        let expected = v
            .secret
            .hmac_sha1(&[candidate.as_bytes(), params.as_bytes()]);
        matched |= super::tags_equal(&expected, &provided);
    }
    if !matched {
        return Err(VerifyError::Mismatch);
    }
    Ok(Verified {
        header,
        id: None,
        timestamp: None,
    })
}

/// Signs a request for `req.url` and `req.body` (the `sign` command).
pub(super) fn write(
    v: &Verifier,
    stamp: &Verified,
    req: &Signed<'_>,
    headers: &mut HeaderMap,
) -> Result<(), VerifyError> {
    let url = req.url.ok_or(VerifyError::NoUrl)?;
    let params = signed_params(url, req.body)?;
    let tag = v.secret.hmac_sha1(&[url.as_bytes(), params.as_bytes()]);
    headers.insert(stamp.header.clone(), header_value(BASE64.encode(tag)));
    Ok(())
}

/// The signed parameter string: empty when the URL carries `bodySHA256` (which must match the
/// body), else the form parameters sorted by name, then value, each written name + value.
fn signed_params(url: &str, body: &[u8]) -> Result<String, VerifyError> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let body_hash = form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "bodySHA256")
        .map(|(_, value)| value.into_owned());
    if let Some(declared) = body_hash {
        let actual = hex::encode(Sha256::digest(body));
        if !super::tags_equal(actual.as_bytes(), declared.as_bytes()) {
            return Err(VerifyError::Mismatch);
        }
        return Ok(String::new());
    }
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    pairs.sort();
    Ok(pairs.into_iter().map(|(k, v)| k + &v).collect())
}

/// The URL as given, without its port, and with the scheme's default port (as the SDK tries).
fn url_variants(url: &str) -> Vec<String> {
    let mut out = vec![url.to_owned()];
    let Ok(uri) = url.parse::<Uri>() else {
        return out;
    };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return out;
    };
    let rest = uri.path_and_query().map_or("", |p| p.as_str());
    let rest = if rest == "/" && !url.ends_with('/') && !url.contains("/?") {
        ""
    } else {
        rest
    };
    match uri.port_u16() {
        Some(_) => out.push(format!("{scheme}://{host}{rest}")),
        None => {
            let port = if scheme == "https" { 443 } else { 80 };
            out.push(format!("{scheme}://{host}:{port}{rest}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use http::{HeaderName, HeaderValue};

    use super::super::{Scheme, Secret};
    use super::*;

    // twilio-python `tests/unit/test_request_validator.py`: auth token "12345", this URI and
    // these parameters give "RSOYDt4T1cUTdK1PDd93/VVr8B8="; the JSON body with its bodySHA256
    // appended to the URI gives "a9nBmqA0ju/hNViExpshrM61xv4="; duplicate parameters give
    // "IK+Dwps556ElfBT0I3Rgjkr1wJU=" (checked again with twilio 9.13.0 from PyPI).
    const TOKEN: &str = "12345";
    const URI: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";
    const FORM: &str = "CallSid=CA1234567890ABCDE&Caller=%2B14158675309&Digits=1234&From=%2B14158675309&To=%2B18005551212";
    const EXPECTED: &str = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
    const JSON_BODY: &str = r#"{"property": "value", "boolean": true}"#;
    const BODY_HASH: &str = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";

    fn check(url: Option<&str>, body: &str, sig: &str) -> Result<Verified, VerifyError> {
        let v = Verifier::new(Scheme::Twilio, None, Secret::new(TOKEN)).unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_static("x-twilio-signature"),
            HeaderValue::from_str(sig).unwrap(),
        );
        v.verify(&Signed {
            headers: &h,
            body: body.as_bytes(),
            call_id: None,
            url,
            now: SystemTime::now(),
        })
    }

    #[test]
    fn sdk_form_vector_in_any_parameter_order() {
        assert!(check(Some(URI), FORM, EXPECTED).is_ok());
        let shuffled = "To=%2B18005551212&Digits=1234&Caller=%2B14158675309&From=%2B14158675309&CallSid=CA1234567890ABCDE";
        assert!(check(Some(URI), shuffled, EXPECTED).is_ok());
        assert_eq!(
            check(Some(URI), &FORM.replace("1234&", "1235&"), EXPECTED),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(check(None, FORM, EXPECTED), Err(VerifyError::NoUrl));
    }

    #[test]
    fn sdk_port_variants() {
        // The SDK strips a port and adds the default one.
        let with_port = URI.replace(".com", ".com:1234");
        assert!(check(Some(&with_port), FORM, EXPECTED).is_ok());
        assert!(check(Some(URI), FORM, "kvajT1Ptam85bY51eRf/AJRuM3w=").is_ok());
        let http = URI.replace("https", "http");
        assert!(check(Some(&http), FORM, "0ZXoZLH/DfblKGATFgpif+LLRf4=").is_ok());
    }

    #[test]
    fn sdk_duplicate_parameters() {
        let form = "Sid=CA123&SidAccount=AC123&Digits=5678&Digits=1234";
        assert!(check(Some(URI), form, "IK+Dwps556ElfBT0I3Rgjkr1wJU=").is_ok());
    }

    #[test]
    fn sdk_json_body_vector() {
        let url = format!("{URI}&bodySHA256={BODY_HASH}");
        assert!(check(Some(&url), JSON_BODY, "a9nBmqA0ju/hNViExpshrM61xv4=").is_ok());
        assert_eq!(
            check(
                Some(&url),
                r#"{"property": "value", "boolean": false}"#,
                "a9nBmqA0ju/hNViExpshrM61xv4="
            ),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn malformed_and_sign() {
        assert_eq!(
            check(Some(URI), FORM, "not base64!"),
            Err(VerifyError::Malformed)
        );
        assert_eq!(check(Some(URI), FORM, "AAAA"), Err(VerifyError::Malformed));
        let v = Verifier::new(Scheme::Twilio, None, Secret::new(TOKEN)).unwrap();
        let headers = v
            .sign_request(
                &Signed {
                    headers: &HeaderMap::new(),
                    body: FORM.as_bytes(),
                    call_id: None,
                    url: Some(URI),
                    now: SystemTime::now(),
                },
                None,
            )
            .unwrap();
        assert_eq!(headers["x-twilio-signature"], EXPECTED);
        assert!(!Scheme::Twilio.can_resign());
    }
}
