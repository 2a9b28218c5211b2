//! Where webhooks go and how they are signed: [`WebhookConfig`].
//!
//! A `WebhookConfig` that exists is valid: every check runs when it is made, so a wrong
//! setting stops the application at start-up instead of failing the first write.

use std::fmt;
use std::time::Duration;

use reqwest::Url;

/// `WEBSOCKET_SERVER_URL`: where events are POSTed.
pub const ENV_URL: &str = "WEBSOCKET_SERVER_URL";
/// `WEBHOOK_SECRET`: the shared HMAC key.
pub const ENV_SECRET: &str = "WEBHOOK_SECRET";
/// `WEBHOOK_TIMEOUT_MS`: the whole-request timeout in milliseconds.
pub const ENV_TIMEOUT_MS: &str = "WEBHOOK_TIMEOUT_MS";
/// `WEBHOOK_STANDARD_HEADERS`: the Standard Webhooks headers are sent unless it is `false`.
pub const ENV_STANDARD_HEADERS: &str = "WEBHOOK_STANDARD_HEADERS";
/// `WEBHOOK_PREVIOUS_SECRETS`: secrets being rotated out, separated by commas or spaces.
/// The sender adds their signatures to the Standard Webhooks header; receivers accept them.
pub const ENV_PREVIOUS_SECRETS: &str = "WEBHOOK_PREVIOUS_SECRETS";

/// The endpoint used when `WEBSOCKET_SERVER_URL` is not set (the original server's port).
pub const DEFAULT_URL: &str = "http://localhost:3001";
/// The whole-request timeout used when `WEBHOOK_TIMEOUT_MS` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5000);
/// How long establishing a connection may take, within the whole-request timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(2000);

/// The shared HMAC key. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret from its text (for receivers built without [`WebhookConfig`]).
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The key bytes, for signing and verifying.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The largest `WEBHOOK_TIMEOUT_MS` accepted: five minutes. A webhook that takes longer
/// than that is not coming back, and a longer timeout would only hold a sender.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// A setting that cannot be used. The message names the setting, the bad value (with any
/// password or query value masked, never a secret) and the fix; what the parser or the
/// file system said is the [`source`](std::error::Error::source) alone
/// ([`ErrorChain`](crate::ErrorChain) prints both). `Debug` shows the variant, its fields
/// and the message, so `?` in `main` says what to set too.
#[derive(thiserror::Error, Clone)]
#[non_exhaustive]
pub enum ConfigError {
    /// The URL does not parse.
    #[error(
        "{ENV_URL} is not a valid URL: {value:?}; set it to the WebSocket server's webhook \
         endpoint, e.g. {ENV_URL}={DEFAULT_URL}"
    )]
    InvalidUrl {
        /// The value given, masked.
        value: String,
        /// Why it does not parse.
        #[source]
        source: url::ParseError,
    },
    /// The URL parses but is not `http` or `https`.
    #[error(
        "{ENV_URL} must be an http:// or https:// URL, got {value:?}; set it to the WebSocket \
         server's webhook endpoint, e.g. {ENV_URL}={DEFAULT_URL}"
    )]
    UnsupportedScheme {
        /// The value given, masked.
        value: String,
    },
    /// No secret, or an empty one.
    #[error(
        "{ENV_SECRET} is not set or empty: webhooks are signed with it and the WebSocket server \
         rejects unsigned ones; set {ENV_SECRET} (in the environment or .env) to the same value \
         as the server's, e.g. one made with `openssl rand -hex 32`"
    )]
    MissingSecret,
    /// The timeout is zero.
    #[error(
        "{ENV_TIMEOUT_MS} is 0: a request needs time to complete; set it to a number of \
         milliseconds, e.g. {ENV_TIMEOUT_MS}=5000 (the default)"
    )]
    ZeroTimeout,
    /// The timeout is longer than [`MAX_TIMEOUT`].
    #[error(
        "{ENV_TIMEOUT_MS} is {} ms, longer than the 300000 ms (5 minutes) allowed: a receiver \
         that has not answered by then will not; set it to at most 300000, e.g. \
         {ENV_TIMEOUT_MS}=5000 (the default)",
        .timeout.as_millis()
    )]
    TimeoutTooLong {
        /// The timeout given.
        timeout: Duration,
    },
    /// The timeout is not a whole number of milliseconds.
    #[error(
        "{ENV_TIMEOUT_MS} is not a whole number of milliseconds: {value:?}; set it like \
         {ENV_TIMEOUT_MS}=5000 (the default)"
    )]
    InvalidTimeout {
        /// The value given.
        value: String,
    },
    /// A boolean switch has a value other than true/false/1/0.
    #[error("{name} must be true or false, got {value:?}; set {name}=true or remove it")]
    InvalidSwitch {
        /// The environment variable.
        name: &'static str,
        /// The value given.
        value: String,
    },
    /// `.env` exists but cannot be read.
    #[error(".env exists but cannot be read; fix its syntax (KEY=value lines) or remove it")]
    DotEnv {
        /// What went wrong: an I/O error, or the line that does not parse.
        #[source]
        source: std::sync::Arc<dotenvy::Error>,
    },
}

impl fmt::Debug for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = self.to_string();
        let mut d;
        match self {
            ConfigError::InvalidUrl { value, source } => {
                d = f.debug_struct("InvalidUrl");
                d.field("value", value).field("source", source);
            }
            ConfigError::UnsupportedScheme { value } => {
                d = f.debug_struct("UnsupportedScheme");
                d.field("value", value);
            }
            ConfigError::MissingSecret => d = f.debug_struct("MissingSecret"),
            ConfigError::ZeroTimeout => d = f.debug_struct("ZeroTimeout"),
            ConfigError::TimeoutTooLong { timeout } => {
                d = f.debug_struct("TimeoutTooLong");
                d.field("timeout", timeout);
            }
            ConfigError::InvalidTimeout { value } => {
                d = f.debug_struct("InvalidTimeout");
                d.field("value", value);
            }
            ConfigError::InvalidSwitch { name, value } => {
                d = f.debug_struct("InvalidSwitch");
                d.field("name", name).field("value", value);
            }
            ConfigError::DotEnv { source } => {
                d = f.debug_struct("DotEnv");
                d.field("source", source);
            }
        }
        d.field("message", &message).finish()
    }
}

/// `url` with its password and query values masked (`***`), for messages and logs. Works
/// on text that does not parse as a URL too.
pub(crate) fn mask_url(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = String::with_capacity(url.len());
    match head.split_once("://") {
        Some((scheme, rest)) => {
            out.push_str(scheme);
            out.push_str("://");
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    match userinfo.split_once(':') {
                        Some((user, _password)) => {
                            out.push_str(user);
                            out.push_str(":***");
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push('@');
                    out.push_str(host);
                }
                None => out.push_str(authority),
            }
            out.push_str(path);
        }
        None => out.push_str(head),
    }
    if let Some(query) = query {
        out.push('?');
        let masked: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) => format!("{k}=***"),
                None => pair.to_owned(),
            })
            .collect();
        out.push_str(&masked.join("&"));
    }
    out
}

/// Where webhooks go, how they are signed, how long a request may take.
///
/// Made by [`WebhookConfig::from_env`] (the `WEBSOCKET_SERVER_URL`, `WEBHOOK_SECRET`,
/// `WEBHOOK_TIMEOUT_MS` variables, read from `.env` too) or [`WebhookConfig::builder`].
/// Both validate everything, so a `WebhookConfig` value is always usable.
///
/// ```
/// use std::time::Duration;
/// use vendora_observe::WebhookConfig;
///
/// let config = WebhookConfig::builder()
///     .url("http://127.0.0.1:3001/webhook")
///     .secret("s3cr3t")
///     .timeout(Duration::from_secs(2))
///     .build()?;
/// assert_eq!(config.url(), "http://127.0.0.1:3001/webhook");
/// assert!(!format!("{config:?}").contains("s3cr3t"));
///
/// let err = WebhookConfig::builder().url("ftp://example.com").secret("x").build().unwrap_err();
/// assert!(err.to_string().contains("WEBSOCKET_SERVER_URL must be an http:// or https:// URL"));
/// # Ok::<(), vendora_observe::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct WebhookConfig {
    url: Url,
    secret: Secret,
    previous_secrets: Vec<Secret>,
    timeout: Duration,
    connect_timeout: Duration,
    standard_headers: bool,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &mask_url(self.url.as_str()))
            .field("secret", &self.secret)
            .field("previous_secrets", &self.previous_secrets.len())
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("standard_headers", &self.standard_headers)
            .finish()
    }
}

impl WebhookConfig {
    /// A builder for code that does not configure through the environment.
    pub fn builder() -> WebhookConfigBuilder {
        WebhookConfigBuilder::default()
    }

    /// Reads `WEBSOCKET_SERVER_URL`, `WEBHOOK_SECRET`, `WEBHOOK_TIMEOUT_MS` and
    /// `WEBHOOK_STANDARD_HEADERS` from the environment, and from `.env` in the working
    /// directory when present (variables already in the environment win, as with Laravel).
    /// `.env` is read, never loaded into the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let dotenv = read_dotenv(std::path::Path::new(".env"))?;
        Self::from_lookup(|name| {
            std::env::var(name)
                .ok()
                .or_else(|| dotenv.get(name).cloned())
        })
    }

    /// Like [`from_env`](Self::from_env) without `.env`, reading variables through `lookup`
    /// (for tests, or for settings kept elsewhere).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut builder = Self::builder();
        if let Some(url) = lookup(ENV_URL) {
            builder = builder.url(url);
        }
        if let Some(secret) = lookup(ENV_SECRET) {
            builder = builder.secret(secret);
        }
        if let Some(previous) = lookup(ENV_PREVIOUS_SECRETS) {
            builder = builder.previous_secrets(split_secrets(&previous));
        }
        if let Some(ms) = lookup(ENV_TIMEOUT_MS) {
            let ms: u64 = ms
                .trim()
                .parse()
                .map_err(|_| ConfigError::InvalidTimeout { value: ms.clone() })?;
            builder = builder.timeout(Duration::from_millis(ms));
        }
        if let Some(flag) = lookup(ENV_STANDARD_HEADERS) {
            let on = match flag.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" | "" => false,
                _ => {
                    return Err(ConfigError::InvalidSwitch {
                        name: ENV_STANDARD_HEADERS,
                        value: flag,
                    });
                }
            };
            builder = builder.standard_headers(on);
        }
        builder.build()
    }

    /// The endpoint, used as given (it may carry a path, and credentials: log
    /// [`WebhookService::endpoint_for_logs`](crate::WebhookService::endpoint_for_logs)
    /// instead).
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    pub(crate) fn parsed_url(&self) -> &Url {
        &self.url
    }

    /// The signing key.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// Secrets being rotated out: the Standard Webhooks header carries a signature with
    /// each of them too, so receivers that still know only one of them accept the webhook.
    pub fn previous_secrets(&self) -> &[Secret] {
        &self.previous_secrets
    }

    /// The whole-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The connect timeout (never longer than the whole-request timeout).
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout.min(self.timeout)
    }

    /// Whether the Standard Webhooks headers are sent beside `X-Webhook-Signature`.
    pub fn standard_headers(&self) -> bool {
        self.standard_headers
    }
}

/// Secrets listed in one variable, separated by commas or white space.
pub(crate) fn split_secrets(list: &str) -> Vec<String> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The variables of a `.env` file, or none when it does not exist.
fn read_dotenv(
    path: &std::path::Path,
) -> Result<std::collections::HashMap<String, String>, ConfigError> {
    match dotenvy::from_path_iter(path) {
        Ok(iter) => iter
            .map(|item| {
                item.map_err(|e| ConfigError::DotEnv {
                    source: std::sync::Arc::new(e),
                })
            })
            .collect(),
        Err(e) if e.not_found() => Ok(Default::default()),
        Err(e) => Err(ConfigError::DotEnv {
            source: std::sync::Arc::new(e),
        }),
    }
}

/// Builds a [`WebhookConfig`]; [`build`](Self::build) validates.
#[must_use]
#[derive(Clone, Default)]
pub struct WebhookConfigBuilder {
    url: Option<String>,
    secret: Option<String>,
    previous_secrets: Vec<String>,
    timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    /// `None`: the default, on.
    standard_headers: Option<bool>,
}

impl fmt::Debug for WebhookConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfigBuilder")
            .field("url", &self.url.as_deref().map(mask_url))
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl WebhookConfigBuilder {
    /// The endpoint (default `http://localhost:3001`).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// The shared secret (required, non-empty).
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Secrets being rotated out (see [`WebhookConfig::previous_secrets`]); empty ones are
    /// ignored.
    pub fn previous_secrets<S: Into<String>>(
        mut self,
        secrets: impl IntoIterator<Item = S>,
    ) -> Self {
        self.previous_secrets = secrets
            .into_iter()
            .map(Into::into)
            .filter(|s| !s.trim().is_empty())
            .collect();
        self
    }

    /// The whole-request timeout (default 5 s, must not be zero).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The connect timeout (default 2 s, capped by the whole-request timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Send the Standard Webhooks headers `webhook-id`, `webhook-timestamp` and
    /// `webhook-signature` beside the legacy `X-Webhook-Signature` (default on). They sign
    /// the id and the time with the body, so a receiver that requires them (ours do by
    /// default) refuses a captured request replayed later or under another id; receivers
    /// that do not know them ignore them. Turn them off only for a receiver that refuses
    /// unknown headers.
    pub fn standard_headers(mut self, on: bool) -> Self {
        self.standard_headers = Some(on);
        self
    }

    /// Validates every setting.
    pub fn build(self) -> Result<WebhookConfig, ConfigError> {
        let raw = self.url.unwrap_or_else(|| DEFAULT_URL.to_owned());
        let url = Url::parse(raw.trim()).map_err(|source| ConfigError::InvalidUrl {
            value: mask_url(&raw),
            source,
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(ConfigError::UnsupportedScheme {
                value: mask_url(&raw),
            });
        }
        let secret = match self.secret {
            Some(s) if !s.trim().is_empty() => Secret(s),
            _ => return Err(ConfigError::MissingSecret),
        };
        let timeout = self.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        if timeout > MAX_TIMEOUT {
            return Err(ConfigError::TimeoutTooLong { timeout });
        }
        Ok(WebhookConfig {
            url,
            secret,
            previous_secrets: self.previous_secrets.into_iter().map(Secret).collect(),
            timeout,
            connect_timeout: self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            standard_headers: self.standard_headers.unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<WebhookConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WebhookConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_apply_when_only_the_secret_is_set() {
        let c = from(&[(ENV_SECRET, "abc")]).unwrap();
        assert_eq!(c.url(), "http://localhost:3001/");
        assert_eq!(c.timeout(), Duration::from_millis(5000));
        assert!(c.standard_headers(), "sent by default");
    }

    #[test]
    fn a_url_with_a_path_is_kept() {
        let c = from(&[
            (ENV_URL, "https://ws.example.com/hooks/pos"),
            (ENV_SECRET, "k"),
        ])
        .unwrap();
        assert_eq!(c.url(), "https://ws.example.com/hooks/pos");
    }

    #[test]
    fn a_missing_secret_says_what_to_set() {
        let msg = from(&[]).unwrap_err().to_string();
        assert!(msg.contains("WEBHOOK_SECRET is not set or empty"), "{msg}");
        assert!(msg.contains("set WEBHOOK_SECRET"), "{msg}");
    }

    #[test]
    fn an_empty_secret_is_refused() {
        let err = from(&[(ENV_SECRET, "  ")]).unwrap_err();
        assert!(matches!(err, ConfigError::MissingSecret), "{err:?}");
    }

    #[test]
    fn an_unparsable_url_is_named_with_its_value() {
        let msg = from(&[(ENV_URL, "not a url"), (ENV_SECRET, "k")])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("WEBSOCKET_SERVER_URL is not a valid URL: \"not a url\""),
            "{msg}"
        );
        assert!(
            msg.contains("e.g. WEBSOCKET_SERVER_URL=http://localhost:3001"),
            "{msg}"
        );
    }

    #[test]
    fn a_non_http_scheme_is_refused() {
        for bad in [
            "ftp://example.com",
            "ws://localhost:3001",
            "file:///tmp/x",
            "mailto:a@b",
        ] {
            let msg = from(&[(ENV_URL, bad), (ENV_SECRET, "k")])
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("must be an http:// or https:// URL"),
                "{bad}: {msg}"
            );
            assert!(msg.contains(bad), "{bad}: {msg}");
        }
    }

    #[test]
    fn a_zero_timeout_is_refused() {
        let msg = from(&[(ENV_SECRET, "k"), (ENV_TIMEOUT_MS, "0")])
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("WEBHOOK_TIMEOUT_MS is 0"), "{msg}");
        let err = WebhookConfig::builder()
            .secret("k")
            .timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(matches!(err, ConfigError::ZeroTimeout), "{err:?}");
    }

    #[test]
    fn a_non_numeric_timeout_is_named() {
        let msg = from(&[(ENV_SECRET, "k"), (ENV_TIMEOUT_MS, "5s")])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("WEBHOOK_TIMEOUT_MS is not a whole number of milliseconds: \"5s\""),
            "{msg}"
        );
    }

    #[test]
    fn a_bad_switch_is_named() {
        let msg = from(&[(ENV_SECRET, "k"), (ENV_STANDARD_HEADERS, "maybe")])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("WEBHOOK_STANDARD_HEADERS must be true or false"),
            "{msg}"
        );
        assert!(
            from(&[(ENV_SECRET, "k"), (ENV_STANDARD_HEADERS, "true")])
                .unwrap()
                .standard_headers()
        );
        assert!(
            !from(&[(ENV_SECRET, "k"), (ENV_STANDARD_HEADERS, "false")])
                .unwrap()
                .standard_headers()
        );
    }

    #[test]
    fn the_secret_never_shows_in_debug_or_errors() {
        let secret = "very-secret-value-123";
        let c = from(&[(ENV_SECRET, secret)]).unwrap();
        assert!(!format!("{c:?}").contains(secret));
        assert!(!format!("{:?}", c.secret()).contains(secret));
        assert!(!format!("{}", c.secret()).contains(secret));
        let b = WebhookConfig::builder().secret(secret).url("::bad");
        assert!(!format!("{b:?}").contains(secret));
        let msg = b.build().unwrap_err().to_string();
        assert!(!msg.contains(secret));
    }

    #[test]
    fn a_timeout_beyond_five_minutes_is_refused_with_the_bound() {
        let msg = from(&[(ENV_SECRET, "k"), (ENV_TIMEOUT_MS, "99999999999999")])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("WEBHOOK_TIMEOUT_MS is 99999999999999 ms"),
            "{msg}"
        );
        assert!(msg.contains("at most 300000"), "{msg}");
        assert!(from(&[(ENV_SECRET, "k"), (ENV_TIMEOUT_MS, "300000")]).is_ok());
    }

    #[test]
    fn passwords_and_query_values_never_show_in_debug_or_errors() {
        let url = "https://user:hunter2@ws.example.com/hook?token=abc123&x";
        let c = from(&[(ENV_SECRET, "k"), (ENV_URL, url)]).unwrap();
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("abc123"),
            "{debug}"
        );
        assert!(
            debug.contains("user:***@ws.example.com/hook?token=***&x"),
            "{debug}"
        );
        let bad = "ftp://user:hunter2@ws.example.com/?token=abc123";
        let msg = from(&[(ENV_SECRET, "k"), (ENV_URL, bad)])
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("hunter2") && !msg.contains("abc123"), "{msg}");
        let unparsable = "http://user:hunter2@[bad/?token=abc123";
        let msg = from(&[(ENV_SECRET, "k"), (ENV_URL, unparsable)])
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("hunter2") && !msg.contains("abc123"), "{msg}");
        let builder = WebhookConfig::builder().url(url);
        assert!(!format!("{builder:?}").contains("hunter2"));
    }

    #[test]
    fn debug_shows_the_variant_its_fields_and_the_message() {
        // `?` in `main` prints this: what to set is in it.
        let err = from(&[]).unwrap_err();
        let debug = format!("{err:?}");
        assert!(debug.starts_with("MissingSecret { message: "), "{debug}");
        assert!(debug.contains("WEBHOOK_SECRET is not set"), "{debug}");
        let err = WebhookConfig::builder()
            .url("http://")
            .secret("s")
            .build()
            .unwrap_err();
        let debug = format!("{err:?}");
        assert!(
            debug.starts_with("InvalidUrl { value: \"http://\", source: EmptyHost, message: "),
            "{debug}"
        );
    }

    #[test]
    fn the_cause_is_the_source_once_not_also_in_the_message() {
        let err = WebhookConfig::builder()
            .url("not a url")
            .secret("s")
            .build()
            .unwrap_err();
        let source = std::error::Error::source(&err).expect("the parser's error");
        assert_eq!(source.to_string(), "relative URL without a base");
        assert!(!err.to_string().contains("relative URL"), "{err}");
        assert_eq!(
            crate::ErrorChain(&err)
                .to_string()
                .matches("relative URL")
                .count(),
            1
        );
    }

    #[test]
    fn dotenv_is_read_without_touching_the_environment() {
        let dir = std::env::temp_dir().join(format!("vo-dotenv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(".env");
        std::fs::write(&path, "VO_TEST_ONLY_IN_DOTENV=from-file\n").unwrap();
        let vars = read_dotenv(&path).unwrap();
        assert_eq!(vars["VO_TEST_ONLY_IN_DOTENV"], "from-file");
        assert!(std::env::var_os("VO_TEST_ONLY_IN_DOTENV").is_none());
        std::fs::write(&path, "NOT A LINE").unwrap();
        let err = read_dotenv(&path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(".env exists but cannot be read"),
            "{err}"
        );
        // The parser's error as data, the line it stopped at included.
        let ConfigError::DotEnv { source } = &err else {
            panic!("{err:?}")
        };
        assert!(
            matches!(**source, dotenvy::Error::LineParse(ref line, _) if line == "NOT A LINE"),
            "{source:?}"
        );
        // A .env that cannot be read (a directory): the I/O error, as data.
        let unreadable = dir.join("unreadable");
        std::fs::create_dir_all(unreadable.join(".env")).unwrap();
        let err = read_dotenv(&unreadable.join(".env")).unwrap_err();
        let ConfigError::DotEnv { source } = &err else {
            panic!("{err:?}")
        };
        assert!(matches!(**source, dotenvy::Error::Io(_)), "{source:?}");
        assert!(read_dotenv(&dir.join("missing")).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connect_timeout_never_exceeds_the_whole_timeout() {
        let c = WebhookConfig::builder()
            .secret("k")
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        assert_eq!(c.connect_timeout(), Duration::from_millis(300));
    }
}
