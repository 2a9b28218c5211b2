//! [`AppToken`]: short-lived, HMAC-signed tokens that the backend mints for its apps and a
//! socket.io server checks on the handshake (`io(url, { auth: { token } })`).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

use vendora_observe::Secret;

/// A token for one app: `vo1.<subject>.<expiry>.<signature>`, where the subject (a device
/// or user id, base64url) and the expiry (Unix seconds) are signed with HMAC-SHA256.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use vendora_observe_server::{AppToken, TokenError};
///
/// let secret = b"app-token-secret";
/// let token = AppToken::mint(secret, "till-7", Duration::from_secs(3600));
/// assert_eq!(AppToken::verify(&[secret], &token, SystemTime::now())?, "till-7");
/// assert_eq!(AppToken::verify(&[b"other"], &token, SystemTime::now()), Err(TokenError::BadSignature));
/// let tomorrow = SystemTime::now() + Duration::from_secs(86_400);
/// assert_eq!(AppToken::verify(&[secret], &token, tomorrow), Err(TokenError::Expired));
/// # Ok::<(), TokenError>(())
/// ```
pub struct AppToken;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a token of this form.
    #[error("not an app token")]
    Malformed,
    /// Signed by no known secret.
    #[error("the token's signature does not match")]
    BadSignature,
    /// Past its expiry.
    #[error("the token has expired")]
    Expired,
}

impl fmt::Debug for AppToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AppToken")
    }
}

impl AppToken {
    /// A token for `subject`, valid for `ttl` from now.
    pub fn mint(secret: &[u8], subject: &str, ttl: Duration) -> String {
        let expiry = (SystemTime::now() + ttl)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let payload = format!("vo1.{}.{expiry}", B64.encode(subject));
        let signature = vendora_observe::sign(secret, payload.as_bytes());
        format!("{payload}.{signature}")
    }

    /// The token's subject, if one of `secrets` signed it and it has not expired at `now`.
    /// The signature is compared in constant time.
    pub fn verify<S: AsRef<[u8]>>(
        secrets: &[S],
        token: &str,
        now: SystemTime,
    ) -> Result<String, TokenError> {
        let (payload, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mut parts = payload.split('.');
        let (Some("vo1"), Some(subject), Some(expiry), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let expiry: u64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
        let subject = B64
            .decode(subject)
            .ok()
            .and_then(|s| String::from_utf8(s).ok())
            .ok_or(TokenError::Malformed)?;
        if !secrets
            .iter()
            .any(|s| vendora_observe::verify(s.as_ref(), payload.as_bytes(), signature))
        {
            return Err(TokenError::BadSignature);
        }
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        if now >= expiry {
            return Err(TokenError::Expired);
        }
        Ok(subject)
    }

    /// [`verify`](Self::verify) with [`Secret`]s.
    pub fn verify_with(
        secrets: &[Secret],
        token: &str,
        now: SystemTime,
    ) -> Result<String, TokenError> {
        let keys: Vec<&[u8]> = secrets.iter().map(Secret::expose).collect();
        Self::verify(&keys, token, now)
    }
}
