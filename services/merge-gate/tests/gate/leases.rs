//! Leases: one holder per repo; a fresh lease is never taken over, a stale one (TTL passed,
//! or holder judged dead by the launcher — here a real process that the test SIGKILLs) is.

use std::process::{Child, Command};
use std::sync::Arc;

use merge_gate::store::{self, LeaseRow};
use merge_gate::{LauncherLiveness, MergeGateService, TtlOnly};
use orchestrator_kit::time::now_ms;
use orchestrator_proto::launcher::v1::JobStatus;
use orchestrator_proto::merge_gate::v1::merge_gate_server::MergeGate;
use orchestrator_proto::merge_gate::v1::{
    AcquireLeaseRequest, GetLeaseRequest, ListLeasesRequest, ReclaimStaleLeasesRequest,
    ReleaseLeaseRequest,
};
use orchestrator_testkit::{TestStorage, on_both_backends};
use tonic::{Code, Request};

use crate::fakes::{FakeGitea, FakeLauncher, gate_over_gitea, open_db};

fn acquire(repo: &str, holder: &str, pid: i64) -> AcquireLeaseRequest {
    AcquireLeaseRequest {
        repo: repo.into(),
        holder_job_id: holder.into(),
        instance_id: "launcher-1".into(),
        pid,
        ttl_s: 0,
    }
}

/// Plants a lease acquired `age_s` ago with a TTL of `ttl_s`, as if taken then.
async fn plant(gate: &MergeGateService, repo: &str, holder: &str, age_s: i64, ttl_s: i64) {
    let row = LeaseRow {
        repo: repo.into(),
        lease_id: format!("planted-{repo}"),
        holder_job_id: holder.into(),
        instance_id: "launcher-0".into(),
        pid: 1,
        acquired_at_ms: now_ms() - age_s * 1000,
        ttl_s,
    };
    assert!(
        store::acquire(gate.db(), &row, "")
            .await
            .expect("plant")
            .is_some()
    );
}

async fn reclaim(gate: &MergeGateService, req: ReclaimStaleLeasesRequest) -> Vec<String> {
    let mut repos: Vec<String> = MergeGate::reclaim_stale_leases(gate, Request::new(req))
        .await
        .expect("reclaim")
        .into_inner()
        .reclaimed
        .into_iter()
        .map(|l| l.repo)
        .collect();
    repos.sort();
    repos
}

async fn holder_of(gate: &MergeGateService, repo: &str) -> Option<String> {
    MergeGate::get_lease(gate, Request::new(GetLeaseRequest { repo: repo.into() }))
        .await
        .expect("get")
        .into_inner()
        .lease
        .map(|l| l.holder_job_id)
}

async fn fresh_and_stale_leases(storage: TestStorage) {
    let db = open_db(&storage).await;
    let gitea = FakeGitea::start(&["acme/app", "acme/old"]).await;
    let mirrors = tempfile::tempdir().expect("tempdir");
    let gate = gate_over_gitea(db, &gitea, mirrors.path(), Arc::new(TtlOnly));

    let a = gate
        .acquire_lease(&acquire("acme/app", "job-a", 11))
        .await
        .expect("a");
    assert!(a.acquired && !a.took_over_stale);
    let lease = a.lease.expect("lease");
    assert_eq!(lease.holder_job_id, "job-a");
    assert_eq!(lease.ttl_s, 3600, "ttl 0 means ORCH_MERGE_LEASE_TTL_S");
    assert_eq!(lease.expires_at_ms(), lease.acquired_at_ms + 3_600_000);

    // A fresh lease is not taken over, by acquiring or by reclaiming.
    let b = gate
        .acquire_lease(&acquire("acme/app", "job-b", 12))
        .await
        .expect("b");
    assert!(!b.acquired);
    assert_eq!(b.lease.expect("the holder's").holder_job_id, "job-a");
    assert!(
        reclaim(&gate, ReclaimStaleLeasesRequest::default())
            .await
            .is_empty()
    );
    assert_eq!(holder_of(&gate, "acme/app").await.as_deref(), Some("job-a"));

    // The holder acquiring again refreshes its own lease.
    let again = gate
        .acquire_lease(&acquire("acme/app", "job-a", 13))
        .await
        .expect("again");
    assert!(again.acquired && !again.took_over_stale);
    assert_eq!(again.lease.expect("lease").pid, 13);

    // A lease past its TTL is taken over by the next acquirer...
    plant(&gate, "acme/old", "job-gone", 10, 5).await;
    let c = gate
        .acquire_lease(&acquire("acme/old", "job-c", 14))
        .await
        .expect("c");
    assert!(c.acquired && c.took_over_stale, "{c:?}");
    assert_eq!(holder_of(&gate, "acme/old").await.as_deref(), Some("job-c"));

    // ...and reclaimed by ReclaimStaleLeases, while the fresh one stays.
    plant(&gate, "acme/other", "job-gone", 10, 5).await;
    plant(&gate, "acme/young", "job-young", 1, 60).await;
    assert_eq!(
        reclaim(&gate, ReclaimStaleLeasesRequest::default()).await,
        vec!["acme/other".to_owned()]
    );
    let left: Vec<String> = MergeGate::list_leases(&gate, Request::new(ListLeasesRequest {}))
        .await
        .expect("list")
        .into_inner()
        .leases
        .into_iter()
        .map(|l| l.repo)
        .collect();
    assert_eq!(left, vec!["acme/app", "acme/old", "acme/young"]);

    // Holders named dead by the caller (the reaper) are reclaimed whatever their TTL.
    assert_eq!(
        reclaim(
            &gate,
            ReclaimStaleLeasesRequest {
                dead_instance_ids: vec![],
                dead_job_ids: vec!["job-young".into()],
            }
        )
        .await,
        vec!["acme/young".to_owned()]
    );
    assert_eq!(
        reclaim(
            &gate,
            ReclaimStaleLeasesRequest {
                dead_instance_ids: vec!["launcher-1".into()],
                dead_job_ids: vec![],
            }
        )
        .await,
        vec!["acme/app".to_owned(), "acme/old".to_owned()]
    );

    // Release: only the holder's call releases.
    gate.acquire_lease(&acquire("acme/app", "job-a", 11))
        .await
        .expect("a");
    let released = |holder: &str| ReleaseLeaseRequest {
        repo: "acme/app".into(),
        holder_job_id: holder.into(),
    };
    let r = MergeGate::release_lease(&gate, Request::new(released("job-b")))
        .await
        .expect("release");
    assert!(!r.into_inner().released);
    let r = MergeGate::release_lease(&gate, Request::new(released("job-a")))
        .await
        .expect("release");
    assert!(r.into_inner().released);
    assert_eq!(holder_of(&gate, "acme/app").await, None);
    gitea.check();
}

async fn concurrent_acquirers(storage: TestStorage) {
    let db = open_db(&storage).await;
    let gitea = FakeGitea::start(&["acme/app"]).await;
    let mirrors = tempfile::tempdir().expect("tempdir");
    let gate = gate_over_gitea(db, &gitea, mirrors.path(), Arc::new(TtlOnly));
    // Known repo first, so that the race is on the statement, not on the forge.
    gate.acquire_lease(&acquire("acme/app", "warm-up", 1))
        .await
        .expect("warm");
    assert!(
        store::release(gate.db(), "acme/app", "warm-up")
            .await
            .expect("release")
    );
    plant(&gate, "acme/app", "job-gone", 10, 5).await;
    for round in 0..2 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..20 {
            let gate = gate.clone();
            tasks.spawn(async move {
                gate.acquire_lease(&acquire("acme/app", &format!("job-{round}-{i}"), 1))
                    .await
                    .expect("acquire")
            });
        }
        let won: Vec<_> = tasks
            .join_all()
            .await
            .into_iter()
            .filter(|a| a.acquired)
            .collect();
        // Round 0 races over a stale lease, round 1 over the fresh lease round 0 left.
        assert_eq!(won.len(), usize::from(round == 0), "round {round}: {won:?}");
    }
}

async fn bad_input(storage: TestStorage) {
    let db = open_db(&storage).await;
    let gitea = FakeGitea::start(&["acme/app"]).await;
    let mirrors = tempfile::tempdir().expect("tempdir");
    let gate = gate_over_gitea(db, &gitea, mirrors.path(), Arc::new(TtlOnly));
    for (req, code, words) in [
        (
            acquire("acme/none", "job-a", 1),
            Code::NotFound,
            "unknown to the gitea forge",
        ),
        (acquire("../etc", "job-a", 1), Code::InvalidArgument, "repo"),
        (acquire("-x/app", "job-a", 1), Code::InvalidArgument, "repo"),
        (
            acquire("acme/app", " ", 1),
            Code::InvalidArgument,
            "holder_job_id is required",
        ),
        (
            acquire("acme/app", "job-a", -1),
            Code::InvalidArgument,
            "pid",
        ),
    ] {
        let err = MergeGate::acquire_lease(&gate, Request::new(req.clone()))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(words), "{req:?}: {err:?}");
    }
    assert_eq!(holder_of(&gate, "acme/app").await, None);
}

/// A real process standing in for a lease holder.
struct Holder(Child);

impl Holder {
    fn spawn() -> Holder {
        Holder(
            Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("spawn sleep"),
        )
    }

    fn pid(&self) -> i64 {
        i64::from(self.0.id())
    }

    /// SIGKILL, then reap it (a zombie would still answer kill(pid, 0)).
    fn sigkill(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().expect("reap");
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn sigkilled_holder(storage: TestStorage) {
    let db = open_db(&storage).await;
    let gitea = FakeGitea::start(&["acme/app", "acme/web"]).await;
    let launcher = FakeLauncher::default();
    let clients = launcher.serve().await;
    let mirrors = tempfile::tempdir().expect("tempdir");
    let gate = gate_over_gitea(
        db,
        &gitea,
        mirrors.path(),
        Arc::new(LauncherLiveness::new(clients)),
    );

    let mut deployer = Holder::spawn();
    launcher
        .running
        .lock()
        .expect("lock")
        .insert("deploy-1".into(), deployer.pid());
    let a = gate
        .acquire_lease(&acquire("acme/app", "deploy-1", deployer.pid()))
        .await
        .expect("a");
    assert!(a.acquired);
    // Alive: neither another acquirer nor a reclaim takes it.
    let b = gate
        .acquire_lease(&acquire("acme/app", "deploy-2", 2))
        .await
        .expect("b");
    assert!(!b.acquired);
    assert!(
        reclaim(&gate, ReclaimStaleLeasesRequest::default())
            .await
            .is_empty()
    );

    deployer.sigkill();
    let b = gate
        .acquire_lease(&acquire("acme/app", "deploy-2", 2))
        .await
        .expect("b");
    assert!(b.acquired && b.took_over_stale, "{b:?}");
    assert_eq!(
        holder_of(&gate, "acme/app").await.as_deref(),
        Some("deploy-2")
    );

    // Reclaimed by ReclaimStaleLeases too, with no acquirer around.
    let mut other = Holder::spawn();
    launcher
        .running
        .lock()
        .expect("lock")
        .insert("deploy-3".into(), other.pid());
    assert!(
        gate.acquire_lease(&acquire("acme/web", "deploy-3", other.pid()))
            .await
            .expect("c")
            .acquired
    );
    assert!(
        reclaim(&gate, ReclaimStaleLeasesRequest::default())
            .await
            .is_empty()
    );
    other.sigkill();
    assert_eq!(
        reclaim(&gate, ReclaimStaleLeasesRequest::default()).await,
        vec!["acme/web".to_owned()]
    );

    // A holder whose job has finished is dead; one the launcher does not know is judged by
    // its TTL only (e.g. an operator's lease taken by hand).
    launcher.running.lock().expect("lock").clear();
    launcher
        .finished
        .lock()
        .expect("lock")
        .insert("deploy-2".into(), JobStatus::Succeeded);
    assert!(
        gate.acquire_lease(&acquire("acme/web", "ops-freeze", 0))
            .await
            .expect("ops")
            .acquired
    );
    assert_eq!(
        reclaim(&gate, ReclaimStaleLeasesRequest::default()).await,
        vec!["acme/app".to_owned()]
    );
    assert_eq!(
        holder_of(&gate, "acme/web").await.as_deref(),
        Some("ops-freeze")
    );
}

on_both_backends!(
    fresh_and_stale_leases,
    concurrent_acquirers,
    bad_input,
    sigkilled_holder
);
