//! The names of the parts of the system, spelled once.

use std::fmt;
use std::str::FromStr;

/// A part of the system that listens on its own address: six gRPC services and the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceName {
    StageEngine,
    Launcher,
    Reaper,
    MergeGate,
    PostDeploy,
    UsageLedger,
    Gateway,
}

impl ServiceName {
    /// Every part, in start-up order: the services others call come first.
    pub const ALL: [ServiceName; 7] = [
        ServiceName::UsageLedger,
        ServiceName::MergeGate,
        ServiceName::PostDeploy,
        ServiceName::Launcher,
        ServiceName::StageEngine,
        ServiceName::Reaper,
        ServiceName::Gateway,
    ];

    /// The name used on the command line, in logs and in docs, e.g. `usage-ledger`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceName::StageEngine => "stage-engine",
            ServiceName::Launcher => "launcher",
            ServiceName::Reaper => "reaper",
            ServiceName::MergeGate => "merge-gate",
            ServiceName::PostDeploy => "post-deploy",
            ServiceName::UsageLedger => "usage-ledger",
            ServiceName::Gateway => "gateway",
        }
    }

    /// The variable that sets its address, e.g. `ORCH_USAGE_LEDGER_ADDR`.
    pub fn addr_var(self) -> &'static str {
        match self {
            ServiceName::StageEngine => "ORCH_STAGE_ENGINE_ADDR",
            ServiceName::Launcher => "ORCH_LAUNCHER_ADDR",
            ServiceName::Reaper => "ORCH_REAPER_ADDR",
            ServiceName::MergeGate => "ORCH_MERGE_GATE_ADDR",
            ServiceName::PostDeploy => "ORCH_POST_DEPLOY_ADDR",
            ServiceName::UsageLedger => "ORCH_USAGE_LEDGER_ADDR",
            ServiceName::Gateway => "ORCH_GATEWAY_ADDR",
        }
    }

    /// The default loopback address.
    pub fn default_addr(self) -> &'static str {
        match self {
            ServiceName::Gateway => "127.0.0.1:8080",
            ServiceName::StageEngine => "127.0.0.1:50051",
            ServiceName::Launcher => "127.0.0.1:50052",
            ServiceName::Reaper => "127.0.0.1:50053",
            ServiceName::MergeGate => "127.0.0.1:50054",
            ServiceName::PostDeploy => "127.0.0.1:50055",
            ServiceName::UsageLedger => "127.0.0.1:50056",
        }
    }

    /// Its storage name: the SQLite file stem and the PostgreSQL schema, e.g. `usage_ledger`.
    pub fn schema(self) -> &'static str {
        match self {
            ServiceName::StageEngine => "stage_engine",
            ServiceName::Launcher => "launcher",
            ServiceName::Reaper => "reaper",
            ServiceName::MergeGate => "merge_gate",
            ServiceName::PostDeploy => "post_deploy",
            ServiceName::UsageLedger => "usage_ledger",
            ServiceName::Gateway => "gateway",
        }
    }

    /// The fully qualified gRPC service name, e.g. `orchestrator.usage_ledger.v1.UsageLedger`;
    /// `None` for the HTTP gateway.
    pub fn grpc_name(self) -> Option<&'static str> {
        match self {
            ServiceName::StageEngine => Some("orchestrator.stage_engine.v1.StageEngine"),
            ServiceName::Launcher => Some("orchestrator.launcher.v1.Launcher"),
            ServiceName::Reaper => Some("orchestrator.reaper.v1.Reaper"),
            ServiceName::MergeGate => Some("orchestrator.merge_gate.v1.MergeGate"),
            ServiceName::PostDeploy => Some("orchestrator.post_deploy.v1.PostDeploy"),
            ServiceName::UsageLedger => Some("orchestrator.usage_ledger.v1.UsageLedger"),
            ServiceName::Gateway => None,
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The error for a name that is not one of ours; it lists the valid ones.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown service '{0}' (expected one of: stage-engine, launcher, reaper, merge-gate, post-deploy, usage-ledger, gateway)"
)]
pub struct UnknownService(pub String);

impl FromStr for ServiceName {
    type Err = UnknownService;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceName::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| UnknownService(s.to_owned()))
    }
}
