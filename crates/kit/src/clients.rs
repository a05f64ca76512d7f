//! A client for every service. The rest of the code calls these whether the service runs in
//! this process (`orchestrator up`, over loopback) or elsewhere: one code path. Each client
//! connects lazily, with a connect timeout and a per-request deadline, and sends the
//! internal bearer token when one is configured.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use orchestrator_proto::{launcher, merge_gate, post_deploy, reaper, stage_engine, usage_ledger};

use crate::config::{Config, Secret};
use crate::service::ServiceName;

/// Adds `authorization: Bearer <token>` to every outgoing call when a token is set.
#[derive(Clone, Default)]
pub struct SendToken {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl SendToken {
    pub fn new(token: Option<&Secret>) -> Self {
        SendToken {
            header: token.and_then(|t| format!("Bearer {}", t.expose()).parse().ok()),
        }
    }
}

impl Interceptor for SendToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

/// The transport every client shares.
pub type Transport = InterceptedService<Channel, SendToken>;

pub type StageEngineClient = stage_engine::v1::stage_engine_client::StageEngineClient<Transport>;
pub type LauncherClient = launcher::v1::launcher_client::LauncherClient<Transport>;
pub type ReaperClient = reaper::v1::reaper_client::ReaperClient<Transport>;
pub type MergeGateClient = merge_gate::v1::merge_gate_client::MergeGateClient<Transport>;
pub type PostDeployClient = post_deploy::v1::post_deploy_client::PostDeployClient<Transport>;
pub type UsageLedgerClient = usage_ledger::v1::usage_ledger_client::UsageLedgerClient<Transport>;

/// How clients reach a service.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub token: Option<Secret>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl ClientSettings {
    pub fn from_config(config: &Config) -> Self {
        ClientSettings {
            token: config.internal_token.clone(),
            connect_timeout: config.rpc_connect_timeout,
            request_timeout: config.rpc_timeout,
        }
    }
}

/// A bad service URL; it names the variable that set it.
#[derive(Debug, thiserror::Error)]
#[error("{var}: invalid URL '{url}': {reason}")]
pub struct BadUrl {
    pub var: String,
    pub url: String,
    pub reason: String,
}

/// Builds a lazily connecting channel to `url` (no I/O until the first call).
pub fn channel(
    service: ServiceName,
    url: &str,
    settings: &ClientSettings,
) -> Result<Transport, BadUrl> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| BadUrl {
            var: crate::config::url_var(service),
            url: url.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.request_timeout)
        .tcp_nodelay(true);
    Ok(InterceptedService::new(
        endpoint.connect_lazy(),
        SendToken::new(settings.token.as_ref()),
    ))
}

/// One client per service, built from the configuration.
#[derive(Clone)]
pub struct Clients {
    pub stage_engine: StageEngineClient,
    pub launcher: LauncherClient,
    pub reaper: ReaperClient,
    pub merge_gate: MergeGateClient,
    pub post_deploy: PostDeployClient,
    pub usage_ledger: UsageLedgerClient,
}

impl Clients {
    /// Builds every client from `config.urls`; nothing connects until the first call.
    pub fn from_config(config: &Config) -> Result<Self, BadUrl> {
        let s = ClientSettings::from_config(config);
        let ch = |svc: ServiceName| channel(svc, config.url(svc), &s);
        Ok(Clients {
            stage_engine: StageEngineClient::new(ch(ServiceName::StageEngine)?),
            launcher: LauncherClient::new(ch(ServiceName::Launcher)?),
            reaper: ReaperClient::new(ch(ServiceName::Reaper)?),
            merge_gate: MergeGateClient::new(ch(ServiceName::MergeGate)?),
            post_deploy: PostDeployClient::new(ch(ServiceName::PostDeploy)?),
            usage_ledger: UsageLedgerClient::new(ch(ServiceName::UsageLedger)?),
        })
    }
}
