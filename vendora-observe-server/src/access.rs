//! Who may connect, and what each may hear: static app tokens with their rooms
//! (`APP_TOKENS`, `APP_TOKENS_FILE`), tokens the backend mints (`APP_TOKEN_SECRET`),
//! revoked subjects (`APP_REVOCATIONS_FILE`), and the live page's own credential
//! (`ADMIN_TOKEN`), never an app's.
//!
//! The files are read again when they change (checked every second), and every app
//! connected with a credential that no longer holds is disconnected: a token removed from
//! `APP_TOKENS_FILE`, a subject revoked.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use vendora_observe::Secret;

use crate::{AppToken, Scope, token_matches};

/// An app token and its scope, from `APP_TOKENS` or `APP_TOKENS_FILE`.
#[derive(Clone)]
pub(crate) struct StaticToken {
    token: Secret,
    scope: Scope,
}

impl std::fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticToken")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl StaticToken {
    pub(crate) fn new(token: impl Into<String>, scope: Scope) -> Self {
        StaticToken {
            token: Secret::new(token),
            scope,
        }
    }
}

/// Entries `token` (every room) or `token=room1|room2`, separated by commas, white space or
/// lines; `#` starts a comment.
pub(crate) fn parse_tokens(text: &str) -> Vec<StaticToken> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.split(|c: char| c == ',' || c.is_whitespace()))
        .filter(|e| !e.is_empty())
        .map(|entry| match entry.split_once('=') {
            Some((token, rooms)) => StaticToken::new(token, Scope::parse_list(rooms)),
            None => StaticToken::new(entry, Scope::All),
        })
        .filter(|t| !t.token.expose().is_empty())
        .collect()
}

/// Lines `subject` (every token of it is revoked) or `subject <unix-seconds>` (tokens
/// issued before that time are); `#` starts a comment.
fn parse_revocations(text: &str) -> HashMap<String, u64> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let subject = parts.next()?.to_owned();
            let before = match parts.next() {
                None => u64::MAX,
                Some(t) => t.parse().ok()?,
            };
            Some((subject, before))
        })
        .collect()
}

/// What a connection was let in with.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub(crate) scope: Scope,
    /// When it stops being valid (minted tokens).
    pub(crate) expires: Option<SystemTime>,
    pub(crate) credential: Credential,
}

#[derive(Debug, Clone)]
pub(crate) enum Credential {
    /// `APP_AUTH=off`.
    Open,
    /// A static token: valid while it is listed.
    Static(StaticToken),
    /// A minted token of `subject`, issued at `issued` (Unix seconds).
    Minted { subject: String, issued: u64 },
    /// `ADMIN_TOKEN`: the live page.
    Admin,
}

impl Grant {
    /// Who connected, as it may be printed: never the token.
    pub(crate) fn label(&self) -> String {
        match &self.credential {
            Credential::Open => "an app (APP_AUTH=off)".to_owned(),
            Credential::Static(t) => format!("an app with a static token for {}", t.scope),
            Credential::Minted { subject, .. } => {
                format!("app \"{}\" ({})", crate::log::escaped(subject), self.scope)
            }
            Credential::Admin => "the live page".to_owned(),
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    NoToken,
    BadToken,
    Expired,
    Revoked,
    NotAdmin,
}

impl Refused {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refused::NoToken => "a token is required: io(url, { auth: { token } })",
            Refused::BadToken => "the token is not valid",
            Refused::Expired => "the token has expired",
            Refused::Revoked => "the token was revoked",
            Refused::NotAdmin => "the live page needs the server's ADMIN_TOKEN",
        }
    }
}

/// Settings of [`Access`].
#[derive(Debug, Clone, Default)]
pub(crate) struct AccessSettings {
    pub(crate) open: bool,
    pub(crate) tokens: Vec<StaticToken>,
    pub(crate) tokens_file: Option<PathBuf>,
    pub(crate) minting: Vec<Secret>,
    pub(crate) revocations_file: Option<PathBuf>,
    pub(crate) admin: Vec<Secret>,
}

pub(crate) struct Access {
    settings: AccessSettings,
    from_file: RwLock<Vec<StaticToken>>,
    revoked: RwLock<HashMap<String, u64>>,
    /// The files' modification times when last read.
    seen: std::sync::Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(path: &Option<PathBuf>) -> Option<SystemTime> {
    path.as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .and_then(|m| m.modified().ok())
}

impl Access {
    /// Reads the files once: a file that is set and cannot be read is an error.
    pub(crate) fn new(settings: AccessSettings) -> Result<Access, String> {
        let read = |path: &PathBuf, name: &str| {
            std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "{name}={} cannot be read ({e}); create it (it may be empty) or unset {name}",
                    path.display()
                )
            })
        };
        let from_file = match &settings.tokens_file {
            Some(p) => parse_tokens(&read(p, "APP_TOKENS_FILE")?),
            None => Vec::new(),
        };
        let revoked = match &settings.revocations_file {
            Some(p) => parse_revocations(&read(p, "APP_REVOCATIONS_FILE")?),
            None => HashMap::new(),
        };
        let seen = (
            modified(&settings.tokens_file),
            modified(&settings.revocations_file),
        );
        Ok(Access {
            settings,
            from_file: RwLock::new(from_file),
            revoked: RwLock::new(revoked),
            seen: std::sync::Mutex::new(seen),
        })
    }

    pub(crate) fn is_open(&self) -> bool {
        self.settings.open
    }

    /// Lets `token` in as an app, or says why not.
    pub(crate) fn admit(&self, token: Option<&str>, now: SystemTime) -> Result<Grant, Refused> {
        if self.settings.open {
            return Ok(Grant {
                scope: Scope::All,
                expires: None,
                credential: Credential::Open,
            });
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(Refused::NoToken)?;
        if let Some(t) = self.static_token(token) {
            return Ok(Grant {
                scope: t.scope.clone(),
                expires: None,
                credential: Credential::Static(t),
            });
        }
        let keys: Vec<&[u8]> = self.settings.minting.iter().map(Secret::expose).collect();
        let claims = match AppToken::verify(&keys, token, now) {
            Ok(c) => c,
            Err(crate::TokenError::Expired) => return Err(Refused::Expired),
            Err(_) => return Err(Refused::BadToken),
        };
        let issued = claims
            .issued_at()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if self.is_revoked(claims.subject(), issued) {
            return Err(Refused::Revoked);
        }
        Ok(Grant {
            scope: claims.scope().clone(),
            expires: Some(claims.expires_at()),
            credential: Credential::Minted {
                subject: claims.subject().to_owned(),
                issued,
            },
        })
    }

    /// Lets the live page in with `ADMIN_TOKEN`.
    pub(crate) fn admit_admin(&self, token: Option<&str>) -> Result<Grant, Refused> {
        let token = token.unwrap_or("");
        let admin = self.settings.open
            || (!token.is_empty()
                && self
                    .settings
                    .admin
                    .iter()
                    .any(|a| token_matches(a.expose(), token.as_bytes())));
        if admin {
            Ok(Grant {
                scope: Scope::All,
                expires: None,
                credential: Credential::Admin,
            })
        } else {
            Err(Refused::NotAdmin)
        }
    }

    fn static_token(&self, token: &str) -> Option<StaticToken> {
        let file = self.from_file.read().unwrap_or_else(|p| p.into_inner());
        self.settings
            .tokens
            .iter()
            .chain(file.iter())
            .find(|t| token_matches(t.token.expose(), token.as_bytes()))
            .cloned()
    }

    fn is_revoked(&self, subject: &str, issued: u64) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(subject)
            .is_some_and(|before| issued < *before)
    }

    /// Whether a connection let in with `grant` may stay (after the files changed).
    pub(crate) fn still_holds(&self, grant: &Grant) -> Result<(), Refused> {
        match &grant.credential {
            Credential::Open | Credential::Admin => Ok(()),
            Credential::Static(t) => {
                let token = String::from_utf8_lossy(t.token.expose()).into_owned();
                match self.static_token(&token) {
                    Some(now) if now.scope == t.scope => Ok(()),
                    _ => Err(Refused::Revoked),
                }
            }
            Credential::Minted { subject, issued } => {
                if self.is_revoked(subject, *issued) {
                    Err(Refused::Revoked)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Reads the files again if they changed since; whether anything was read.
    pub(crate) fn reload(&self) -> bool {
        let now = (
            modified(&self.settings.tokens_file),
            modified(&self.settings.revocations_file),
        );
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return false;
        }
        let mut changed = false;
        if seen.0 != now.0
            && let Some(path) = &self.settings.tokens_file
        {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    *self.from_file.write().unwrap_or_else(|p| p.into_inner()) =
                        parse_tokens(&text);
                    changed = true;
                }
                Err(e) => crate::log::warn(format_args!(
                    "APP_TOKENS_FILE={} cannot be read ({e}); keeping the tokens read before",
                    path.display()
                )),
            }
        }
        if seen.1 != now.1
            && let Some(path) = &self.settings.revocations_file
        {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    *self.revoked.write().unwrap_or_else(|p| p.into_inner()) =
                        parse_revocations(&text);
                    changed = true;
                }
                Err(e) => crate::log::warn(format_args!(
                    "APP_REVOCATIONS_FILE={} cannot be read ({e}); keeping the revocations read \
                     before",
                    path.display()
                )),
            }
        }
        *seen = now;
        changed
    }

    /// Whether there are files to watch.
    pub(crate) fn has_files(&self) -> bool {
        self.settings.tokens_file.is_some() || self.settings.revocations_file.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn access(settings: AccessSettings) -> Access {
        Access::new(settings).unwrap()
    }

    #[test]
    fn static_tokens_carry_their_rooms_and_a_bare_token_every_room() {
        let a = access(AccessSettings {
            tokens: parse_tokens("till-1=store:1|store:9, hq # head office\n"),
            ..Default::default()
        });
        let now = SystemTime::now();
        assert_eq!(
            a.admit(Some("till-1"), now).unwrap().scope,
            Scope::rooms(["store:1", "store:9"])
        );
        assert_eq!(a.admit(Some("hq"), now).unwrap().scope, Scope::All);
        assert_eq!(a.admit(Some("till-2"), now).unwrap_err(), Refused::BadToken);
        assert_eq!(a.admit(None, now).unwrap_err(), Refused::NoToken);
        assert_eq!(
            a.admit_admin(Some("hq")).unwrap_err(),
            Refused::NotAdmin,
            "an app token never opens the live page"
        );
    }

    #[test]
    fn minted_tokens_expire_and_subjects_are_revoked_from_the_file() {
        let dir = std::env::temp_dir().join(format!("vo-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("revoked");
        std::fs::write(&file, "").unwrap();
        let a = access(AccessSettings {
            minting: vec![Secret::new("mint")],
            revocations_file: Some(file.clone()),
            ..Default::default()
        });
        let token = AppToken::new("till-7", Scope::rooms(["store:1"]), Duration::from_secs(60))
            .mint(b"mint");
        let now = SystemTime::now();
        let grant = a.admit(Some(&token), now).unwrap();
        assert_eq!(
            a.admit(Some(&token), now + Duration::from_secs(61))
                .unwrap_err(),
            Refused::Expired
        );
        // Revoked: tokens issued before a time, or all of them.
        let issued = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        std::fs::write(&file, format!("till-7 {issued}\n")).unwrap();
        set_modified(&file, now + Duration::from_secs(5));
        assert!(a.reload());
        assert!(a.still_holds(&grant).is_ok(), "issued at, not before");
        std::fs::write(&file, "till-7  # lost\n").unwrap();
        set_modified(&file, now + Duration::from_secs(10));
        assert!(a.reload());
        assert_eq!(a.still_holds(&grant).unwrap_err(), Refused::Revoked);
        assert_eq!(a.admit(Some(&token), now).unwrap_err(), Refused::Revoked);
        assert!(!a.reload(), "unchanged: not read again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_subject_from_a_token_cannot_forge_a_log_line() {
        let a = access(AccessSettings {
            minting: vec![Secret::new("mint")],
            ..Default::default()
        });
        let token = AppToken::new(
            "till\r\n✓ forged line\u{1b}[2J",
            Scope::rooms(["store:1"]),
            Duration::from_secs(60),
        )
        .mint(b"mint");
        let label = a.admit(Some(&token), SystemTime::now()).unwrap().label();
        assert!(!label.chars().any(char::is_control), "{label:?}");
        assert!(label.contains("\\u{d}\\u{a}"), "{label}");
    }

    /// Files written within one second can share a modification time on coarse clocks.
    fn set_modified(path: &std::path::Path, at: SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(at)
            .unwrap();
    }
}
