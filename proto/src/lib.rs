//! The gRPC contracts of the orchestrator: one package per service,
//! `orchestrator.<service>.v1`, generated from `proto/orchestrator/**`.

#![allow(clippy::all, rust_2018_idioms, missing_docs)]

/// The encoded `FileDescriptorSet` of every package, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("orchestrator_descriptor");

pub mod usage_ledger {
    pub mod v1 {
        tonic::include_proto!("orchestrator.usage_ledger.v1");
    }
}
pub mod stage_engine {
    pub mod v1 {
        tonic::include_proto!("orchestrator.stage_engine.v1");
    }
}
pub mod launcher {
    pub mod v1 {
        tonic::include_proto!("orchestrator.launcher.v1");
    }
}
pub mod reaper {
    pub mod v1 {
        tonic::include_proto!("orchestrator.reaper.v1");
    }
}
pub mod merge_gate {
    pub mod v1 {
        tonic::include_proto!("orchestrator.merge_gate.v1");
    }
}
pub mod post_deploy {
    pub mod v1 {
        tonic::include_proto!("orchestrator.post_deploy.v1");
    }
}
