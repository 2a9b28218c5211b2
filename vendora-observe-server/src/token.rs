//! What an app may hear: its [`Scope`] (the rooms it may hear, or every room), and
//! [`AppToken`]s, the short-lived HMAC tokens the backend mints for its apps, which carry
//! the scope and the expiry and which any server checks on the socket.io handshake.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};

/// The rooms an app may hear. An event that names rooms (an entity with
/// `#[observe(room = …)]`) reaches the apps whose scope holds one of them; an event without
/// rooms reaches every app.
///
/// ```
/// use vendora_observe_server::Scope;
///
/// let till = Scope::rooms(["store:1"]);
/// assert!(till.allows(Some(&["store:1".to_owned()])));
/// assert!(!till.allows(Some(&["store:2".to_owned()])));
/// assert!(till.allows(None), "an untargeted event reaches every app");
/// assert!(!till.allows(Some(&[])), "an event for no room reaches no app");
/// assert!(Scope::All.allows(Some(&["store:2".to_owned()])));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every room: head office, a dashboard. Written `"*"` in a token.
    All,
    /// These rooms only.
    Rooms(Vec<String>),
}

impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Scope::All => s.serialize_str("*"),
            Scope::Rooms(rooms) => rooms.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Every(String),
            Rooms(Vec<String>),
        }
        match Written::deserialize(d)? {
            Written::Every(s) if s == "*" => Ok(Scope::All),
            Written::Every(other) => Err(serde::de::Error::custom(format!(
                "rooms is a list of rooms or \"*\", not {other:?}"
            ))),
            Written::Rooms(rooms) => Ok(Scope::Rooms(rooms)),
        }
    }
}

impl Scope {
    /// These rooms only.
    pub fn rooms<S: Into<String>>(rooms: impl IntoIterator<Item = S>) -> Scope {
        Scope::Rooms(rooms.into_iter().map(Into::into).collect())
    }

    /// Whether an event with these rooms (`None`: an event for every app) reaches an app
    /// with this scope.
    pub fn allows(&self, event_rooms: Option<&[String]>) -> bool {
        match (self, event_rooms) {
            (_, None) | (Scope::All, Some(_)) => true,
            (Scope::Rooms(mine), Some(theirs)) => theirs.iter().any(|r| mine.contains(r)),
        }
    }

    /// The scope of an `APP_TOKENS` entry's rooms: `store:1|store:2`.
    pub(crate) fn parse_list(list: &str) -> Scope {
        Scope::rooms(list.split('|').map(str::trim).filter(|r| !r.is_empty()))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::All => f.write_str("every room"),
            Scope::Rooms(rooms) if rooms.is_empty() => f.write_str("no room"),
            Scope::Rooms(rooms) => f.write_str(&rooms.join("|")),
        }
    }
}

/// A token for one app: who it is (`subject`: a till, a device), what it may hear
/// ([`Scope`]), when it was issued and until when it is valid.
///
/// Minted as `vo2.<payload>.<signature>`: the payload is the claims as JSON,
/// `{"sub":"till-7","rooms":["store:1"],"iat":1765000000,"exp":1765003600}` (`"rooms":"*"`
/// for every room; times in Unix seconds), base64url without padding; the signature is the
/// lowercase hex HMAC-SHA256 of `vo2.<payload>` under the minting secret
/// (`APP_TOKEN_SECRET`). A server in another language checks one in a few lines; the
/// README shows it in JavaScript.
///
/// The server enforces the expiry during the session too: the app is told
/// (`vendora:disconnect` with `{"reason": "token expired"}`) and disconnected when its token
/// expires, and reconnects with a fresh one. A subject can be revoked without a restart
/// (`APP_REVOCATIONS_FILE`).
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use vendora_observe_server::{AppToken, Scope, TokenError};
///
/// let secret = b"app-token-secret";
/// let token = AppToken::new("till-7", Scope::rooms(["store:1"]), Duration::from_secs(3600))
///     .mint(secret);
/// let claims = AppToken::verify(&[secret], &token, SystemTime::now())?;
/// assert_eq!((claims.subject(), claims.scope()), ("till-7", &Scope::rooms(["store:1"])));
/// assert_eq!(AppToken::verify(&[b"other"], &token, SystemTime::now()), Err(TokenError::BadSignature));
/// let tomorrow = SystemTime::now() + Duration::from_secs(86_400);
/// assert_eq!(AppToken::verify(&[secret], &token, tomorrow), Err(TokenError::Expired));
/// # Ok::<(), TokenError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppToken {
    #[serde(rename = "sub")]
    subject: String,
    rooms: Scope,
    #[serde(rename = "iat")]
    issued_at: u64,
    #[serde(rename = "exp")]
    expires_at: u64,
}

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

const VERSION: &str = "vo2";

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl AppToken {
    /// Claims for `subject` with `scope`, issued now and valid for `ttl`.
    pub fn new(subject: impl Into<String>, scope: Scope, ttl: Duration) -> AppToken {
        let now = SystemTime::now();
        AppToken {
            subject: subject.into(),
            rooms: scope,
            issued_at: unix(now),
            expires_at: unix(now + ttl),
        }
    }

    /// The token: these claims, signed with `secret`.
    pub fn mint(&self, secret: &[u8]) -> String {
        let json = serde_json::to_vec(self).expect("claims serialise");
        let payload = format!("{VERSION}.{}", B64.encode(json));
        let signature = vendora_observe::sign(secret, payload.as_bytes());
        format!("{payload}.{signature}")
    }

    /// The claims of `token`, if one of `secrets` signed it and it has not expired at
    /// `now`. The signature is compared in constant time, before the payload is read.
    pub fn verify<S: AsRef<[u8]>>(
        secrets: &[S],
        token: &str,
        now: SystemTime,
    ) -> Result<AppToken, TokenError> {
        let (signed, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let Some((VERSION, payload)) = signed.split_once('.') else {
            return Err(TokenError::Malformed);
        };
        if !secrets
            .iter()
            .any(|s| vendora_observe::verify(s.as_ref(), signed.as_bytes(), signature))
        {
            return Err(TokenError::BadSignature);
        }
        let claims: AppToken = B64
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(TokenError::Malformed)?;
        if unix(now) >= claims.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// Who the token is for.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// What it may hear.
    pub fn scope(&self) -> &Scope {
        &self.rooms
    }

    /// When it was minted.
    pub fn issued_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.issued_at)
    }

    /// When it stops being valid.
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.expires_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_is_the_documented_one() {
        let claims = AppToken {
            subject: "till-7".into(),
            rooms: Scope::rooms(["store:1"]),
            issued_at: 1_765_000_000,
            expires_at: 1_765_003_600,
        };
        let token = claims.mint(b"k");
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let payload = signed.strip_prefix("vo2.").unwrap();
        assert_eq!(
            String::from_utf8(B64.decode(payload).unwrap()).unwrap(),
            r#"{"sub":"till-7","rooms":["store:1"],"iat":1765000000,"exp":1765003600}"#
        );
        assert_eq!(signature, vendora_observe::sign(b"k", signed.as_bytes()));
        let every = AppToken {
            rooms: Scope::All,
            ..claims
        };
        let json = String::from_utf8(
            B64.decode(every.mint(b"k").split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert!(json.contains(r#""rooms":"*""#), "{json}");
        let at = UNIX_EPOCH + Duration::from_secs(1_765_000_001);
        assert_eq!(AppToken::verify(&[b"k"], &every.mint(b"k"), at), Ok(every));
    }

    #[test]
    fn a_tampered_payload_or_an_old_format_is_refused() {
        let token =
            AppToken::new("till-7", Scope::rooms(["store:1"]), Duration::from_secs(60)).mint(b"k");
        let mut parts: Vec<&str> = token.split('.').collect();
        let wider = B64.encode(br#"{"sub":"till-7","rooms":"*","iat":0,"exp":99999999999}"#);
        parts[1] = &wider;
        let now = SystemTime::now();
        assert_eq!(
            AppToken::verify(&[b"k"], &parts.join("."), now),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            AppToken::verify(&[b"k"], "vo1.dGlsbA.99.abcd", now),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            AppToken::verify(&[b"k"], "plain-token", now),
            Err(TokenError::Malformed)
        );
    }
}
