//! `orchestrator staging-check [--strict] [--artifact PATH]`: the registered checks against
//! the stack the configuration names (`ORCH_<SERVICE>_URL`, `ORCH_GATEWAY_URL`,
//! `ORCH_DATA_DIR` or `ORCH_DATABASE_URL`), the verdict on stdout, exit 0 or 1.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use orchestrator_kit::clients::Clients;
use orchestrator_kit::{Config, ServiceName, telemetry};
use sqlx::migrate::Migrator;

use crate::checks::{self, GrpcSandbox};
use crate::{StagingConfig, Status, Verdict, run_staging_check, write_artifact};

/// Runs the command. `migrator_of` names the migrations this build embeds per service.
pub fn main(
    strict: bool,
    artifact: Option<PathBuf>,
    migrator_of: fn(ServiceName) -> &'static Migrator,
) -> ExitCode {
    let mut stdout = std::io::stdout();
    let config = match Config::from_process() {
        Ok(c) => c,
        Err(e) => return internal_error(&mut stdout, &e, strict, artifact),
    };
    telemetry::init(config.log_format, &config.log_filter);
    let staging = match StagingConfig::from_env(&config.env) {
        Ok(s) => s,
        Err(e) => return internal_error(&mut stdout, &e, strict, artifact),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return internal_error(&mut stdout, &e, strict, artifact),
    };
    // Channels are made inside the runtime they will run on.
    let clients = {
        let _inside = runtime.enter();
        match Clients::from_config(&config) {
            Ok(c) => c,
            Err(e) => return internal_error(&mut stdout, &e, strict, artifact),
        }
    };
    let tolerant = staging.tolerant && !strict;
    let mode = if tolerant {
        "tolerant (sandbox-infra failures C9a, C9b are waived)".to_owned()
    } else if strict {
        "strict (--strict)".to_owned()
    } else {
        "strict (ORCH_STAGING_INFRA_TOLERANCE_ENABLED=false)".to_owned()
    };
    let _ = writeln!(stdout, "MODE: {mode}");
    let migrators = ServiceName::ALL
        .into_iter()
        .filter(|s| s.grpc_name().is_some())
        .map(|s| (s, migrator_of(s)))
        .collect();
    let verdict = runtime.block_on(async {
        let registered = checks::registered(
            &config,
            staging.sandbox_work_item.clone(),
            Arc::new(GrpcSandbox { clients }),
            migrators,
            staging.check_timeout,
        );
        // A little over the checks' own deadlines, so their own messages win.
        let limit = staging.check_timeout + std::time::Duration::from_secs(2);
        run_staging_check(
            registered,
            tolerant,
            limit,
            artifact.as_deref(),
            &mut stdout,
        )
        .await
    });
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    exit_code(&verdict)
}

/// The checks could not even start: FAILED, and the artifact says so too.
fn internal_error(
    out: &mut dyn Write,
    e: &dyn std::fmt::Display,
    strict: bool,
    artifact: Option<PathBuf>,
) -> ExitCode {
    let verdict = Verdict {
        status: Status::Failed,
        exit_code: 1,
        waived: Vec::new(),
    };
    let _ = writeln!(out, "ERROR staging-check: {e}");
    if let Some(path) = artifact
        && let Err(e) = write_artifact(&path, &verdict, !strict, &[])
    {
        let _ = writeln!(out, "ERROR artifact: cannot write {}: {e}", path.display());
    }
    let _ = writeln!(out, "INFRA-WAIVED: none");
    let _ = writeln!(out, "VERDICT: FAILED");
    exit_code(&verdict)
}

fn exit_code(v: &Verdict) -> ExitCode {
    if v.exit_code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
