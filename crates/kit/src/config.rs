//! Configuration from the environment and `./.env`: typed, with defaults, and a start-up
//! error naming the variable when a value is bad. Tests build an [`Env`] from pairs instead
//! of mutating the process environment.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::service::ServiceName;

/// A bad configuration value. The message names the variable; it never echoes a secret.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct ConfigError {
    pub var: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(var: &str, reason: impl Into<String>) -> Self {
        ConfigError {
            var: var.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A value that must never reach a log line: `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// Returns the value itself, for the one place that has to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A snapshot of the configuration variables: `./.env` overlaid by the process environment.
/// An empty value counts as unset, so `VAR=` in `.env` falls back to the default.
#[derive(Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
}

impl fmt::Debug for Env {
    // Values may be secrets: only the names are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.vars.keys().collect();
        names.sort();
        f.debug_struct("Env").field("names", &names).finish()
    }
}

impl Env {
    /// Reads `dotenv_path` (when it exists), then the process environment on top of it.
    pub fn load(dotenv_path: &Path) -> Result<Self, ConfigError> {
        let mut vars = HashMap::new();
        if dotenv_path.exists() {
            let iter = dotenvy::from_path_iter(dotenv_path).map_err(|e| {
                ConfigError::new(
                    &dotenv_path.display().to_string(),
                    format!("cannot read: {e}"),
                )
            })?;
            for item in iter {
                let (k, v) = item.map_err(|e| {
                    ConfigError::new(
                        &dotenv_path.display().to_string(),
                        format!("cannot parse: {e}"),
                    )
                })?;
                vars.insert(k, v);
            }
        }
        for (k, v) in std::env::vars_os() {
            if let (Some(k), Some(v)) = (k.to_str(), v.to_str()) {
                vars.insert(k.to_owned(), v.to_owned());
            }
        }
        Ok(Env { vars })
    }

    /// Builds an environment from explicit pairs (tests, benchmarks).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Env {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// Sets one variable, returning the changed environment.
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// Returns the value of `name`, or `None` when it is unset or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    /// Returns the variables whose names start with `prefix` (e.g. `PLANE_BOT_TOKEN_`).
    pub fn with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.vars
            .iter()
            .filter(move |(k, v)| k.starts_with(prefix) && !v.trim().is_empty())
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Parses `name` as `T`, or returns `default` when it is unset.
    pub fn parse<T>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw.trim().parse().map_err(|e| {
                ConfigError::new(name, format!("invalid value '{}': {e}", raw.trim()))
            }),
        }
    }

    /// Parses `name` as a boolean (`true/false`, `1/0`, `yes/no`, `on/off`).
    pub fn bool(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::new(
                    name,
                    format!("invalid value '{v}': expected true or false"),
                )),
            },
        }
    }

    /// Returns `name` as a secret, or `None` when unset.
    pub fn secret(&self, name: &str) -> Option<Secret> {
        self.get(name).map(|v| Secret::new(v.trim()))
    }

    /// Returns the directory `name` names, or `default` when unset, made absolute against
    /// the current directory: git and agents run with other working directories, where a
    /// relative path would point elsewhere.
    pub fn dir(
        &self,
        name: &str,
        default: impl FnOnce() -> PathBuf,
    ) -> Result<PathBuf, ConfigError> {
        let dir = self
            .get(name)
            .map(|d| PathBuf::from(d.trim()))
            .unwrap_or_else(default);
        std::path::absolute(&dir)
            .map_err(|e| ConfigError::new(name, format!("cannot resolve '{}': {e}", dir.display())))
    }

    /// `ORCH_DATA_DIR` (default `./var`), absolute: the SQLite files and the default home
    /// of every other directory the services keep.
    pub fn data_dir(&self) -> Result<PathBuf, ConfigError> {
        self.dir("ORCH_DATA_DIR", || PathBuf::from("./var"))
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Readable on a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected text or json".to_owned()),
        }
    }
}

/// Where the gRPC clients and the storage point, and how the process logs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The address each part listens on (`ORCH_<SERVICE>_ADDR`); port 0 lets the OS choose.
    pub listen: BTreeMap<ServiceName, SocketAddr>,
    /// Where the others reach each service (`ORCH_<SERVICE>_URL`); by default its listen
    /// address, with an unspecified host (0.0.0.0) reached on loopback.
    pub urls: BTreeMap<ServiceName, String>,
    /// `ORCH_DATA_DIR`: one SQLite file per service lives here.
    pub data_dir: PathBuf,
    /// `ORCH_DATABASE_URL`: when a `postgres://` URL, every service uses PostgreSQL.
    pub database_url: Option<Secret>,
    /// `ORCH_INTERNAL_TOKEN`: when set, every RPC but health and reflection requires it.
    pub internal_token: Option<Secret>,
    pub log_format: LogFormat,
    /// `ORCH_LOG`: a tracing filter, e.g. `info` or `info,launcher=debug`.
    pub log_filter: String,
    /// `ORCH_RPC_CONNECT_TIMEOUT_MS`.
    pub rpc_connect_timeout: Duration,
    /// `ORCH_RPC_TIMEOUT_MS`: the deadline of one unary RPC made by our clients.
    pub rpc_timeout: Duration,
    /// Every variable, for the service-specific sections.
    pub env: Env,
}

impl Config {
    /// Reads `./.env` and the process environment.
    pub fn from_process() -> Result<Self, ConfigError> {
        Config::from_env(Env::load(Path::new(".env"))?)
    }

    /// Builds the configuration from `env`; the first bad value is the error.
    pub fn from_env(env: Env) -> Result<Self, ConfigError> {
        let mut listen = BTreeMap::new();
        let mut urls = BTreeMap::new();
        for service in ServiceName::ALL {
            let var = service.addr_var();
            let raw = env
                .get(var)
                .unwrap_or(service.default_addr())
                .trim()
                .to_owned();
            let addr: SocketAddr = raw.parse().map_err(|_| {
                ConfigError::new(
                    var,
                    format!(
                        "invalid address '{raw}': expected IP:PORT, e.g. {}",
                        service.default_addr()
                    ),
                )
            })?;
            listen.insert(service, addr);
            let url_var = url_var(service);
            let url = match env.get(&url_var) {
                Some(u) => {
                    let u = u.trim();
                    if !(u.starts_with("http://") || u.starts_with("https://")) {
                        return Err(ConfigError::new(
                            &url_var,
                            format!("invalid URL '{u}': expected http://HOST:PORT"),
                        ));
                    }
                    u.trim_end_matches('/').to_owned()
                }
                None => url_for(addr),
            };
            urls.insert(service, url);
        }

        let database_url = env.secret("ORCH_DATABASE_URL");
        if let Some(url) = &database_url {
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                // Never echo the URL: it may hold a password.
                return Err(ConfigError::new(
                    "ORCH_DATABASE_URL",
                    "expected a postgres:// URL (leave it unset for the embedded SQLite)",
                ));
            }
        }

        Ok(Config {
            listen,
            urls,
            data_dir: env.data_dir()?,
            database_url,
            internal_token: env.secret("ORCH_INTERNAL_TOKEN"),
            log_format: env.parse("ORCH_LOG_FORMAT", LogFormat::Text)?,
            log_filter: env.get("ORCH_LOG").unwrap_or("info").trim().to_owned(),
            rpc_connect_timeout: Duration::from_millis(
                env.parse("ORCH_RPC_CONNECT_TIMEOUT_MS", 2_000u64)?,
            ),
            rpc_timeout: Duration::from_millis(env.parse("ORCH_RPC_TIMEOUT_MS", 10_000u64)?),
            env,
        })
    }

    /// Records where `service` actually listens (after binding port 0), and points the
    /// clients there unless `ORCH_<SERVICE>_URL` says otherwise.
    pub fn set_bound(&mut self, service: ServiceName, addr: SocketAddr) {
        self.listen.insert(service, addr);
        if self.env.get(&url_var(service)).is_none() {
            self.urls.insert(service, url_for(addr));
        }
    }

    /// Returns the URL at which `service` is reached.
    pub fn url(&self, service: ServiceName) -> &str {
        self.urls
            .get(&service)
            .map(String::as_str)
            .unwrap_or_default()
    }
}

/// The variable that overrides where a service is reached, e.g. `ORCH_LAUNCHER_URL`.
pub fn url_var(service: ServiceName) -> String {
    service.addr_var().trim_end_matches("_ADDR").to_owned() + "_URL"
}

fn url_for(addr: SocketAddr) -> String {
    let host = if addr.ip().is_unspecified() {
        if addr.is_ipv4() {
            "127.0.0.1".to_owned()
        } else {
            "[::1]".to_owned()
        }
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    format!("http://{host}:{}", addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_configuration() {
        let c = Config::from_env(Env::default()).expect("defaults");
        assert_eq!(
            c.listen[&ServiceName::UsageLedger].to_string(),
            "127.0.0.1:50056"
        );
        assert_eq!(
            c.listen[&ServiceName::Gateway].to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(c.url(ServiceName::StageEngine), "http://127.0.0.1:50051");
        assert_eq!(
            c.data_dir,
            std::env::current_dir().expect("cwd").join("var"),
            "a relative ORCH_DATA_DIR is made absolute"
        );
        assert!(c.database_url.is_none());
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn a_bad_address_names_its_variable() {
        let err =
            Config::from_env(Env::from_pairs([("ORCH_LAUNCHER_ADDR", "nowhere")])).unwrap_err();
        assert_eq!(err.var, "ORCH_LAUNCHER_ADDR");
        assert!(
            err.to_string()
                .starts_with("ORCH_LAUNCHER_ADDR: invalid address 'nowhere'"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_number_names_its_variable() {
        let err = Config::from_env(Env::from_pairs([("ORCH_RPC_TIMEOUT_MS", "soon")])).unwrap_err();
        assert_eq!(err.var, "ORCH_RPC_TIMEOUT_MS");
    }

    #[test]
    fn a_database_url_that_is_not_postgres_is_refused_without_echoing_it() {
        let err = Config::from_env(Env::from_pairs([(
            "ORCH_DATABASE_URL",
            "mysql://u:hunter2@h/db",
        )]))
        .unwrap_err();
        assert_eq!(err.var, "ORCH_DATABASE_URL");
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn unspecified_hosts_are_reached_on_loopback_and_urls_can_be_overridden() {
        let c = Config::from_env(Env::from_pairs([
            ("ORCH_REAPER_ADDR", "0.0.0.0:7000"),
            ("ORCH_LAUNCHER_URL", "http://launcher:50052/"),
        ]))
        .expect("config");
        assert_eq!(c.url(ServiceName::Reaper), "http://127.0.0.1:7000");
        assert_eq!(c.url(ServiceName::Launcher), "http://launcher:50052");
    }

    #[test]
    fn secrets_never_print() {
        let c =
            Config::from_env(Env::from_pairs([("ORCH_INTERNAL_TOKEN", "s3cr3t")])).expect("config");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert_eq!(
            c.internal_token.as_ref().map(Secret::expose),
            Some("s3cr3t")
        );
    }

    #[test]
    fn dotenv_is_read_and_the_process_environment_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(".env");
        std::fs::write(&path, "TEST_ONLY_FROM_FILE=file\nPATH=from-file\n").expect("write");
        let env = Env::load(&path).expect("load");
        assert_eq!(env.get("TEST_ONLY_FROM_FILE"), Some("file"));
        assert_ne!(env.get("PATH"), Some("from-file"));
    }

    #[test]
    fn booleans_accept_the_usual_spellings() {
        let env = Env::from_pairs([("A", "yes"), ("B", "0"), ("C", "maybe")]);
        assert!(env.bool("A", false).expect("A"));
        assert!(!env.bool("B", true).expect("B"));
        assert_eq!(env.bool("C", true).unwrap_err().var, "C");
        assert!(env.bool("D", true).expect("D"));
    }
}
