//! HMAC-SHA256 signatures: the legacy `X-Webhook-Signature` header and, optionally,
//! Standard Webhooks' `webhook-signature`.
//!
//! Verification is constant-time (`hmac`'s `verify_slice`), so a receiver built on
//! [`verify`] does not leak how much of a forged signature was right.
//!
//! ```
//! use vendora_observe::signature::{sign, verify};
//!
//! let body = br#"{"event":"product:deleted","data":{"id":3}}"#;
//! let header = sign(b"s3cr3t", body);
//! assert_eq!(header.len(), 64);
//! assert!(verify(b"s3cr3t", body, &header));
//! assert!(!verify(b"other", body, &header));
//! assert!(!verify(b"s3cr3t", b"{}", &header));
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// Lowercase hex of HMAC-SHA256(`secret`, `body`): the `X-Webhook-Signature` value, the
/// same as PHP's `hash_hmac('sha256', $body, $secret)` and node's
/// `crypto.createHmac('sha256', secret).update(body).digest('hex')`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let hex = legacy_hex(mac(secret), body);
    // Hex digits are ASCII.
    String::from_utf8_lossy(&hex).into_owned()
}

fn legacy_hex(mut m: HmacSha256, body: &[u8]) -> [u8; 64] {
    m.update(body);
    let mut out = [0u8; 64];
    // 32 bytes always fit 64 hex digits.
    let _ = hex::encode_to_slice(m.finalize().into_bytes(), &mut out);
    out
}

/// Whether `header` is the hex HMAC-SHA256 of `body` under `secret`, compared in constant
/// time. Accepts upper- or lowercase hex and surrounding white space; anything else that
/// is not 64 hex digits is `false`.
#[must_use = "a signature that does not verify must be refused"]
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let mut expected = [0u8; 32];
    if hex::decode_to_slice(header.trim(), &mut expected).is_err() {
        return false;
    }
    let mut m = mac(secret);
    m.update(body);
    m.verify_slice(&expected).is_ok()
}

/// The key Standard Webhooks signs with: the base64 part of a `whsec_…` secret, or the
/// secret's own bytes when it is not in that form.
fn standard_key(secret: &[u8]) -> Vec<u8> {
    secret
        .strip_prefix(b"whsec_")
        .and_then(|b64| BASE64.decode(b64).ok())
        .unwrap_or_else(|| secret.to_vec())
}

fn standard_mac(secret: &[u8], id: &str, timestamp: u64, body: &[u8]) -> HmacSha256 {
    standard_message(mac(&standard_key(secret)), id, timestamp, body)
}

fn standard_message(mut m: HmacSha256, id: &str, timestamp: u64, body: &[u8]) -> HmacSha256 {
    m.update(id.as_bytes());
    m.update(b".");
    m.update(itoa::Buffer::new().format(timestamp).as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// One secret's keyed HMAC states, made once and cloned for each message: a webhook's
/// signatures then cost only the hashing of the message.
#[derive(Clone)]
pub(crate) struct Signer {
    legacy: HmacSha256,
    standard: HmacSha256,
}

impl Signer {
    pub(crate) fn new(secret: &[u8]) -> Signer {
        Signer {
            legacy: mac(secret),
            standard: mac(&standard_key(secret)),
        }
    }

    /// The `X-Webhook-Signature` value, as [`sign`] makes it.
    pub(crate) fn legacy(&self, body: &[u8]) -> [u8; 64] {
        legacy_hex(self.legacy.clone(), body)
    }

    /// Appends the `v1,…` entry [`standard_signature`] makes.
    pub(crate) fn standard_into(&self, id: &str, timestamp: u64, body: &[u8], out: &mut String) {
        let tag = standard_message(self.standard.clone(), id, timestamp, body)
            .finalize()
            .into_bytes();
        out.push_str("v1,");
        BASE64.encode_string(tag, out);
    }
}

/// The Standard Webhooks `webhook-signature` value: `v1,<base64 HMAC-SHA256 over
/// "{id}.{timestamp}.{body}">`. A `whsec_` secret is base64-decoded first, as the
/// specification's libraries do; any other secret is used as its bytes.
///
/// ```
/// # use vendora_observe::signature::standard_signature;
/// // The specification's published test vector.
/// let sig = standard_signature(
///     b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
///     "msg_p5jXN8AQM9LWM0D4loKWxJek",
///     1614265330,
///     br#"{"test": 2432232314}"#,
/// );
/// assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
/// ```
pub fn standard_signature(secret: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let tag = standard_mac(secret, id, timestamp, body)
        .finalize()
        .into_bytes();
    format!("v1,{}", BASE64.encode(tag))
}

/// Why a Standard Webhooks signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StandardRejection {
    /// `webhook-timestamp` is not a Unix time in seconds.
    BadTimestamp,
    /// The timestamp is further from now than the tolerance: a replay or a skewed clock.
    Stale,
    /// No `v1,` signature in the header matches.
    Mismatch,
}

/// Verifies Standard Webhooks headers: the timestamp must lie within `tolerance` of `now`
/// (the specification suggests 5 minutes), and one of the space-separated `v1,` entries of
/// `signature_header` must match, compared in constant time.
pub fn verify_standard(
    secret: &[u8],
    id: &str,
    timestamp: &str,
    signature_header: &str,
    body: &[u8],
    now: SystemTime,
    tolerance: Duration,
) -> Result<(), StandardRejection> {
    let ts: u64 = timestamp
        .trim()
        .parse()
        .map_err(|_| StandardRejection::BadTimestamp)?;
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    if now.abs_diff(ts) > tolerance.as_secs() {
        return Err(StandardRejection::Stale);
    }
    let m = standard_mac(secret, id, ts, body);
    let matched = signature_header
        .split_whitespace()
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|b64| BASE64.decode(b64).ok())
        .any(|tag| m.clone().verify_slice(&tag).is_ok());
    if matched {
        Ok(())
    } else {
        Err(StandardRejection::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signer_signs_as_the_public_functions_do() {
        let body = br#"{"event":"stock:updated","data":{"productId":1,"newStock":7}}"#;
        for secret in [
            &b"s3cr3t"[..],
            b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            b"",
        ] {
            let signer = Signer::new(secret);
            assert_eq!(
                signer.legacy(body).as_slice(),
                sign(secret, body).as_bytes()
            );
            for ts in [0, 9, 10, 1_614_265_330, u64::MAX] {
                let mut out = String::from("x ");
                signer.standard_into("msg_1", ts, body, &mut out);
                assert_eq!(
                    out,
                    format!("x {}", standard_signature(secret, "msg_1", ts, body))
                );
                // The reference: the timestamp as Rust writes it.
                let mut m = mac(&standard_key(secret));
                m.update(format!("msg_1.{ts}.").as_bytes());
                m.update(body);
                assert_eq!(
                    out,
                    format!("x v1,{}", BASE64.encode(m.finalize().into_bytes()))
                );
            }
        }
    }

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 4231 test cases for HMAC-SHA-256 (case 5, truncated output, is left out).
    #[test]
    fn rfc_4231_vectors() {
        let cases: &[(Vec<u8>, Vec<u8>, &str)] = &[
            (
                vec![0x0b; 20],
                b"Hi There".to_vec(),
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?".to_vec(),
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                vec![0xaa; 20],
                vec![0xdd; 50],
                "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
            ),
            (
                unhex("0102030405060708090a0b0c0d0e0f10111213141516171819"),
                vec![0xcd; 50],
                "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
            ),
            (
                vec![0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
            (
                vec![0xaa; 131],
                b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.".to_vec(),
                "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
            ),
        ];
        for (key, data, want) in cases {
            assert_eq!(sign(key, data), *want);
            assert!(verify(key, data, want));
        }
    }

    #[test]
    fn verify_rejects_tampering_and_malformed_headers() {
        let body = b"{\"event\":\"a\",\"data\":{}}";
        let good = sign(b"k", body);
        assert!(verify(b"k", body, &good.to_uppercase()));
        assert!(verify(b"k", body, &format!("  {good}\n")));
        let mut flipped = good.clone().into_bytes();
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        assert!(!verify(b"k", body, std::str::from_utf8(&flipped).unwrap()));
        assert!(!verify(b"k", body, &good[..62]));
        assert!(!verify(b"k", body, ""));
        assert!(!verify(b"k", body, &format!("sha256={good}")));
        assert!(!verify(b"k", body, &"zz".repeat(32)));
    }

    #[test]
    fn standard_webhooks_published_vector() {
        let secret = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        let sig = standard_signature(secret, id, 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let at = UNIX_EPOCH + Duration::from_secs(1614265330 + 10);
        let tol = Duration::from_secs(300);
        let header = format!("v1,bm9wZQ== {sig}");
        assert_eq!(
            verify_standard(secret, id, "1614265330", &header, body, at, tol),
            Ok(())
        );
        assert_eq!(
            verify_standard(secret, id, "1614265330", "v1,bm9wZQ==", body, at, tol),
            Err(StandardRejection::Mismatch)
        );
        let late = UNIX_EPOCH + Duration::from_secs(1614265330 + 301);
        assert_eq!(
            verify_standard(secret, id, "1614265330", &sig, body, late, tol),
            Err(StandardRejection::Stale)
        );
        assert_eq!(
            verify_standard(secret, id, "soon", &sig, body, at, tol),
            Err(StandardRejection::BadTimestamp)
        );
    }
}
