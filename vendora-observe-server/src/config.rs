//! [`ServerConfig`]: the server's settings, from the environment (and `.env`, which the
//! environment overrides) or built in code. A wrong setting stops the start with a
//! [`ConfigError`] that names it, its value (never a secret) and the fix.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use vendora_observe::Secret;

use crate::Scope;
use crate::access::{AccessSettings, StaticToken, parse_tokens};
use crate::history::Retention;
use crate::http::Limits;

/// A setting the server cannot start with: the message names the setting, the value and
/// the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub setting: &'static str,
    message: String,
}

impl ConfigError {
    pub(crate) fn new(setting: &'static str, message: impl Into<String>) -> Self {
        ConfigError {
            setting,
            message: message.into(),
        }
    }
}

/// How the server is set up. [`ServerConfig::from_env`] reads every setting from the
/// environment; the builder methods set them in code.
///
/// ```
/// use vendora_observe_server::{Scope, ServerConfig};
///
/// let config = ServerConfig::new("s3cr3t")
///     .app_token("till-7-token", Scope::rooms(["store:1"]))
///     .admin_token("page-token");
/// assert!(format!("{config:?}").contains("app_tokens: 1"));
/// assert!(!format!("{config:?}").contains("s3cr3t"));
/// ```
#[derive(Clone)]
pub struct ServerConfig {
    pub(crate) secrets: Vec<Secret>,
    pub(crate) require_standard_headers: bool,
    pub(crate) access: AccessSettings,
    pub(crate) allowed_origins: Vec<String>,
    pub(crate) trusted_proxies: Vec<IpAddr>,
    pub(crate) redis_url: Option<String>,
    pub(crate) redis_ca: Option<PathBuf>,
    pub(crate) retention: Retention,
    pub(crate) limits: Limits,
    pub(crate) app_buffer: usize,
    pub(crate) ping_interval: Duration,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("secrets", &self.secrets.len())
            .field("require_standard_headers", &self.require_standard_headers)
            .field("open", &self.access.open)
            .field("app_tokens", &self.access.tokens.len())
            .field("app_tokens_file", &self.access.tokens_file)
            .field("minting_secrets", &self.access.minting.len())
            .field("revocations_file", &self.access.revocations_file)
            .field("admin_tokens", &self.access.admin.len())
            .field("allowed_origins", &self.allowed_origins)
            .field("trusted_proxies", &self.trusted_proxies)
            .field(
                "redis",
                &self.redis_url.as_deref().map(crate::history::redis::mask),
            )
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// A server verifying webhooks signed with `secret`. Apps must authenticate: give it
    /// [`app_token`](Self::app_token)s or a [`minting_secret`](Self::minting_secret).
    pub fn new(secret: impl Into<String>) -> Self {
        ServerConfig {
            secrets: vec![Secret::new(secret)],
            require_standard_headers: true,
            access: AccessSettings::default(),
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            redis_url: None,
            redis_ca: None,
            retention: Retention::default(),
            limits: Limits::default(),
            app_buffer: 256,
            ping_interval: Duration::from_secs(10),
        }
    }

    /// A token apps may present as it is, and what it lets them hear (`APP_TOKENS`).
    pub fn app_token(mut self, token: impl Into<String>, scope: Scope) -> Self {
        self.access.tokens.push(StaticToken::new(token, scope));
        self
    }

    /// The secret of the tokens the backend mints with
    /// [`AppToken`](crate::AppToken) (`APP_TOKEN_SECRET`; several while rotating).
    pub fn minting_secret(mut self, secret: impl Into<String>) -> Self {
        self.access.minting.push(Secret::new(secret));
        self
    }

    /// The live page's credential (`ADMIN_TOKEN`).
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        self.access.admin.push(Secret::new(token));
        self
    }

    /// Any app may connect, from any origin, and hear every event (`APP_AUTH=off`): for
    /// development only.
    pub fn open(mut self) -> Self {
        self.access.open = true;
        self
    }

    /// Accepts webhooks signed only with the legacy `X-Webhook-Signature`, which a captured
    /// request can be replayed with (`WEBHOOK_REQUIRE_STANDARD_HEADERS=false`).
    pub fn accept_legacy_signatures(mut self) -> Self {
        self.require_standard_headers = false;
        self
    }

    /// Shares history and apps with the other servers on this Redis (`REDIS_URL`).
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// How long and how much history is kept for apps that reconnect.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// The HTTP limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Every setting from the environment, and from `.env` in the working directory (the
    /// environment wins). See the README's table for each variable.
    pub fn from_env() -> Result<Self, ConfigError> {
        let dotenv: std::collections::HashMap<String, String> = dotenvy::from_path_iter(".env")
            .map(|vars| vars.flatten().collect())
            .unwrap_or_default();
        Self::from_lookup(|name| {
            std::env::var(name)
                .ok()
                .or_else(|| dotenv.get(name).cloned())
        })
    }

    pub(crate) fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let list = |name: &str| -> Vec<String> {
            var(name)
                .map(|v| {
                    v.split(|c: char| c == ',' || c.is_whitespace())
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let switch = |name: &'static str| -> Result<Option<bool>, ConfigError> {
            match var(name).map(|v| v.trim().to_ascii_lowercase()) {
                None => Ok(None),
                Some(v) if ["1", "true", "on", "yes"].contains(&v.as_str()) => Ok(Some(true)),
                Some(v) if ["0", "false", "off", "no"].contains(&v.as_str()) => Ok(Some(false)),
                Some(v) => Err(ConfigError::new(
                    name,
                    format!("{name} must be true or false (on/off), got {v:?}"),
                )),
            }
        };
        let number = |name: &'static str,
                      min: u64,
                      example: &str|
         -> Result<Option<u64>, ConfigError> {
            match var(name) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n >= min => Ok(Some(n)),
                    _ => Err(ConfigError::new(
                        name,
                        format!(
                            "{name} must be a whole number of at least {min}, e.g. {name}={example}; got {v:?}"
                        ),
                    )),
                },
            }
        };
        let path = |name: &str| var(name).map(PathBuf::from);

        let secret = var("WEBHOOK_SECRET").ok_or_else(|| {
            ConfigError::new(
                "WEBHOOK_SECRET",
                "WEBHOOK_SECRET is not set: set it to the backend's secret (the one its \
                 WEBHOOK_SECRET holds), in the environment or .env",
            )
        })?;
        let mut config = ServerConfig::new(secret);
        config.secrets.extend(
            list("WEBHOOK_PREVIOUS_SECRETS")
                .into_iter()
                .map(Secret::new),
        );
        config.require_standard_headers =
            switch("WEBHOOK_REQUIRE_STANDARD_HEADERS")?.unwrap_or(true);
        config.access = AccessSettings {
            open: switch("APP_AUTH")? == Some(false),
            tokens: var("APP_TOKENS")
                .map(|t| parse_tokens(&t))
                .unwrap_or_default(),
            tokens_file: path("APP_TOKENS_FILE"),
            minting: list("APP_TOKEN_SECRET")
                .into_iter()
                .map(Secret::new)
                .collect(),
            revocations_file: path("APP_REVOCATIONS_FILE"),
            admin: list("ADMIN_TOKEN").into_iter().map(Secret::new).collect(),
        };
        config.allowed_origins = list("ALLOWED_ORIGINS");
        for origin in &config.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.trim_end_matches('/') != origin
            {
                return Err(ConfigError::new(
                    "ALLOWED_ORIGINS",
                    format!(
                        "ALLOWED_ORIGINS holds {origin:?}, which is not an origin: write \
                         scheme://host[:port] with no path, e.g. ALLOWED_ORIGINS=https://pos.example.com"
                    ),
                ));
            }
        }
        for proxy in list("TRUSTED_PROXIES") {
            let ip = proxy.parse().map_err(|_| {
                ConfigError::new(
                    "TRUSTED_PROXIES",
                    format!(
                        "TRUSTED_PROXIES holds {proxy:?}, which is not an IP address: list the \
                         addresses of the proxies in front of the server, e.g. TRUSTED_PROXIES=10.0.0.2"
                    ),
                )
            })?;
            config.trusted_proxies.push(ip);
        }
        if let Some(url) = var("REDIS_URL") {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError::new(
                    "REDIS_URL",
                    format!(
                        "REDIS_URL {} is not a Redis URL: write redis://host:6379 (or rediss:// \
                         for TLS)",
                        crate::history::redis::mask(&url)
                    ),
                ));
            }
            config.redis_url = Some(url);
        }
        config.redis_ca = path("REDIS_CA_CERT");
        if let Some(secs) = number("HISTORY_MAX_AGE_SECS", 1, "600")? {
            config.retention.max_age = Duration::from_secs(secs);
        }
        if let Some(bytes) = number("HISTORY_MAX_BYTES", 1 << 20, "67108864")? {
            config.retention.max_bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        }
        if let Some(n) = number("APP_BUFFER", 16, "256")? {
            config.app_buffer = usize::try_from(n).unwrap_or(usize::MAX);
        }
        let a = &config.access;
        if !a.open && a.tokens.is_empty() && a.tokens_file.is_none() && a.minting.is_empty() {
            return Err(ConfigError::new(
                "APP_TOKENS",
                "apps must authenticate, and no way to do so is set: set APP_TOKENS (tokens apps \
                 present, e.g. APP_TOKENS=till-token=store:1 for one store's apps), \
                 APP_TOKENS_FILE, or APP_TOKEN_SECRET (to verify tokens your backend mints with \
                 vendora_observe_server::AppToken), or APP_AUTH=off to let any app connect \
                 (not for production)",
            ));
        }
        Ok(config)
    }

    /// The static tokens (for tests of the parser).
    #[cfg(test)]
    pub(crate) fn tokens(&self) -> &[StaticToken] {
        &self.access.tokens
    }
}

/// `HOST` and `PORT`: where the server listens (default `127.0.0.1:3001`).
pub(crate) fn listen_address() -> Result<(String, u16), ConfigError> {
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port = match std::env::var("PORT") {
        Err(_) => 3001,
        Ok(p) => p.trim().parse().map_err(|_| {
            ConfigError::new(
                "PORT",
                format!("PORT must be a port number, e.g. PORT=3001, got {p:?}"),
            )
        })?,
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<ServerConfig, ConfigError> {
        let map: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ServerConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn each_wrong_setting_is_named_with_its_fix() {
        let err = |vars: &[(&str, &str)]| from(vars).unwrap_err();
        assert_eq!(err(&[]).setting, "WEBHOOK_SECRET");
        assert!(
            err(&[("WEBHOOK_SECRET", "k")])
                .to_string()
                .contains("set APP_TOKENS")
        );
        let base = [("WEBHOOK_SECRET", "k"), ("APP_TOKENS", "t")];
        let with = |extra: (&'static str, &'static str)| {
            let mut v = base.to_vec();
            v.push(extra);
            err(&v)
        };
        assert_eq!(with(("APP_AUTH", "maybe")).setting, "APP_AUTH");
        assert_eq!(
            with(("ALLOWED_ORIGINS", "pos.example.com")).setting,
            "ALLOWED_ORIGINS"
        );
        assert_eq!(
            with(("TRUSTED_PROXIES", "proxy")).setting,
            "TRUSTED_PROXIES"
        );
        let redis = with(("REDIS_URL", "http://:hunter2@redis:6379"));
        assert_eq!(redis.setting, "REDIS_URL");
        assert!(!redis.to_string().contains("hunter2"), "{redis}");
        assert_eq!(
            with(("HISTORY_MAX_AGE_SECS", "ten")).setting,
            "HISTORY_MAX_AGE_SECS"
        );
        assert!(
            with(("HISTORY_MAX_BYTES", "10"))
                .to_string()
                .contains("at least 1048576")
        );
    }

    #[test]
    fn tokens_carry_rooms_and_legacy_signatures_are_an_explicit_choice() {
        let c = from(&[
            ("WEBHOOK_SECRET", "k"),
            ("APP_TOKENS", "t1=store:1|store:2, t2"),
        ])
        .unwrap();
        assert_eq!(c.tokens().len(), 2);
        assert!(c.require_standard_headers, "required by default");
        let c = from(&[
            ("WEBHOOK_SECRET", "k"),
            ("APP_AUTH", "off"),
            ("WEBHOOK_REQUIRE_STANDARD_HEADERS", "false"),
        ])
        .unwrap();
        assert!(!c.require_standard_headers);
        assert!(!format!("{c:?}").contains("\"k\""));
    }
}
