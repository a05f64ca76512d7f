//! Test support shared by every crate's integration tests.
//!
//! - [`TestStorage`]: a fresh SQLite directory, or a fresh database in a throwaway
//!   PostgreSQL cluster that this process starts (in a temp dir, on a free loopback port, as
//!   an unprivileged user when we are root) and that dies with the process.
//! - [`on_both_backends!`]: runs one async test body on SQLite and on PostgreSQL. Where
//!   PostgreSQL's binaries are missing, the PostgreSQL half prints `SKIPPED <name>: <why>`
//!   on the terminal — never a silent pass — and fails instead when `ORCH_REQUIRE_POSTGRES`
//!   is set (CI sets it).
//! - [`procs::ProcStack`]: the stack as separate `orchestrator serve` processes (SQLite or
//!   PostgreSQL, N launcher replicas), killed and restarted by name.
//! - [`agent::RecordingAgent`]: an agent script that records every run it makes (start,
//!   end, attempt, which replica), to check exactly-once and the cap from the agent's side.

pub mod agent;
mod pg;
pub mod procs;

use std::io::Write;

use orchestrator_kit::Env;
use orchestrator_kit::db::Location;

pub use pg::{PgCluster, cluster, durable_cluster};

/// The external contracts the tests read (webhook samples, API specs, the CLI's outputs):
/// `tests/contracts/` in this repository, copied from the design folder with their sources
/// named in its README, so that a plain clone runs its tests. `ORCH_CONTRACTS_DIR`
/// overrides it (to try a newer capture).
pub fn contracts_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("ORCH_CONTRACTS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/contracts")
        });
    assert!(
        dir.is_dir(),
        "the external contracts are missing at {} (set ORCH_CONTRACTS_DIR)",
        dir.display()
    );
    dir
}

/// The checkout's `examples/agents` (a prompt for every role, the scripted agent).
pub fn examples_agents_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/agents")
}

/// Storage for one test: its location, and the variables that point a stack at it.
pub struct TestStorage {
    pub location: Location,
    pub name: &'static str,
    env: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl TestStorage {
    /// A fresh, empty SQLite data directory.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a temp dir for SQLite");
        let path = dir.path().to_path_buf();
        TestStorage {
            location: Location::SqliteDir(path.clone()),
            name: "sqlite",
            env: vec![("ORCH_DATA_DIR".into(), path.display().to_string())],
            _dir: Some(dir),
        }
    }

    /// A fresh database in the shared throwaway cluster, or `None` (after saying so) when
    /// this machine has no PostgreSQL.
    pub async fn postgres(test_name: &str) -> Option<Self> {
        let cluster = match cluster() {
            Ok(c) => c,
            Err(why) => {
                skip(test_name, &why);
                return None;
            }
        };
        let url = cluster.fresh_database().await;
        Some(TestStorage {
            location: Location::Postgres(orchestrator_kit::Secret::new(url.clone())),
            name: "postgres",
            env: vec![("ORCH_DATABASE_URL".into(), url)],
            _dir: None,
        })
    }

    /// The variables that select this storage, on top of `env`.
    pub fn apply(&self, mut env: Env) -> Env {
        for (k, v) in &self.env {
            env = env.with(k.clone(), v.clone());
        }
        env
    }
}

/// Says on the terminal (past the test harness's capture) that `test_name` was skipped, or
/// fails when skipping is not allowed.
/// The repository the harnesses' work items name.
pub const TEST_REPO: &str = "acme/app";

/// `ORCH_DEPLOY_TARGETS_JSON` for the shared harnesses (`tests/it/common.rs`,
/// [`procs::ProcStackSpec`]): a trivial but real target for [`TEST_REPO`], whose staging
/// and deploy commands are `true` (on every machine). The launcher runs it and its exit
/// status decides `staging_status` / `deploy_status`, as a real deploy's would; without a
/// target a deploy stage parks its work item blocked ("no deploy target for <repo>").
/// A test that sets the variable itself replaces this one.
pub fn trivial_deploy_targets() -> String {
    format!(
        r#"{{"{TEST_REPO}":{{"staging_command":["true"],"deploy_command":["true"],"timeout_s":60}}}}"#
    )
}

pub fn skip(test_name: &str, why: &str) {
    if std::env::var_os("ORCH_REQUIRE_POSTGRES").is_some() {
        panic!("{test_name}: PostgreSQL is required here (ORCH_REQUIRE_POSTGRES) but {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test_name}: {why}");
}

/// Runs each named `async fn(TestStorage)` on SQLite and on PostgreSQL, as the tests
/// `sqlite::<name>` and `postgres::<name>`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::TestStorage::sqlite()).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(storage) = $crate::TestStorage::postgres(concat!(module_path!(), "::", stringify!($name))).await {
                        super::$name(storage).await
                    }
                }
            )*
        }
    };
}

/// A Plane project as `GET /api/v1/workspaces/{slug}/projects/{id}/` answers it, for the
/// fake Plane servers of the tests. There is no captured sample in `shared/contracts`: the
/// keys are derived, like the contract's own samples, from makeplane/plane's
/// `ProjectSerializer` (`fields = "__all__"` of the `Project` model plus its annotated
/// counts) in `apps/api/plane/api/serializers/project.py` and `db/models/project.py`;
/// the values are made up. Plane stores `identifier` upper-cased, at most 12 characters.
pub fn plane_project_json(id: &str, identifier: &str) -> String {
    format!(
        r#"{{"id": "{id}", "total_members": 3, "total_cycles": 0, "total_modules": 0, "is_member": true, "sort_order": 65535.0, "member_role": 20, "is_deployed": false, "cover_image_url": null, "created_at": "2026-05-01T09:00:00.000000Z", "updated_at": "2026-05-01T09:00:00.000000Z", "deleted_at": null, "name": "Orchestrated project", "description": "", "description_text": null, "description_html": null, "network": 2, "identifier": "{identifier}", "emoji": null, "icon_prop": null, "module_view": true, "cycle_view": true, "issue_views_view": true, "page_view": true, "intake_view": false, "is_time_tracking_enabled": false, "is_issue_type_enabled": false, "guest_view_all_features": false, "cover_image": null, "archive_in": 0, "close_in": 0, "logo_props": {{}}, "archived_at": null, "timezone": "UTC", "external_source": null, "external_id": null, "created_by": "3fa85f64-5717-4562-b3fc-2c963f66afa6", "updated_by": null, "workspace": "5f2a3c1e-8d4b-4e6a-9f0c-1a2b3c4d5e6f", "default_assignee": null, "project_lead": null, "cover_image_asset": null, "estimate": null, "default_state": null}}"#
    )
}
