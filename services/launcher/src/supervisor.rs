//! The supervisor: the dispatcher that claims jobs (woken at once by an enqueue or a
//! finished job, with a slow poll as a fallback), the heartbeat of this instance and of
//! its live runs, restart reconciliation, and the end of every run (the guarded settle).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrator_kit::Db;
use orchestrator_kit::group_commit::{BatchWrite, GroupWriter};
use orchestrator_kit::retry::jitter;
use orchestrator_kit::time::now_ms;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::agent::AgentEnv;
use crate::config::LauncherConfig;
use crate::outbox::{self, Delivery, Dispatcher, Effect};
use crate::peers::Peers;
use crate::rules::{End, Limits, next_state};
use crate::store::{self, ClaimFilter, JobRow, Kind, SettleEntry, Status};
use crate::workspace::Workspace;

/// Why a run was asked to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// `CancelJob` or `FlipTerminal` already wrote the job's end: only the process must go.
    EndedElsewhere,
    /// This launcher is shutting down: the job goes back to the queue.
    Shutdown,
    /// This launcher's heartbeat is lost (see [`Supervisor::heartbeat_lost`]): a reserved
    /// job it holds and has not started goes back to the queue. Sent to no other run.
    HeartbeatLost,
}

/// A run in flight in this launcher.
#[derive(Clone)]
pub struct RunHandle {
    pub attempt: u32,
    pub kind: Kind,
    /// The agent's pid (= its process group), 0 until spawned.
    pub pid: Arc<AtomicI32>,
    pub stop: CancellationToken,
    pub stop_reason: Arc<Mutex<Option<StopReason>>>,
    /// Turns true when the run is over (TailLog ends its stream).
    pub ended: watch::Receiver<bool>,
    /// Set once the run no longer counts against this instance's claims (see
    /// [`Supervisor::release_slot`]).
    pub(crate) slot_released: Arc<AtomicBool>,
    /// Set once a reserved run has its slot (until then it is held).
    pub(crate) started: Arc<AtomicBool>,
}

impl RunHandle {
    /// Asks the run to stop (the first reason wins).
    pub fn stop(&self, reason: StopReason) {
        if let Ok(mut r) = self.stop_reason.lock()
            && r.is_none()
        {
            *r = Some(reason);
        }
        self.stop.cancel();
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.stop_reason.lock().ok().and_then(|r| r.clone())
    }
}

pub(crate) struct Inner {
    pub db: Db,
    pub config: Arc<LauncherConfig>,
    pub peers: Arc<dyn Peers>,
    pub workspace: Workspace,
    pub agent_env: AgentEnv,
    /// Wakes the LLM dispatcher (an enqueue, an LLM slot freed, a job requeued).
    pub wake: Notify,
    /// Wakes the reserved jobs' dispatcher (an enqueue, a reserved run ended).
    pub reserved_wake: Notify,
    /// One permit per reserved job that may run at once (`ORCH_RESERVED_CONCURRENCY`); a
    /// claimed reserved job without one is held (`ORCH_LAUNCHER_LOCAL_QUEUE`).
    pub reserved_slots: Arc<Semaphore>,
    /// The group commit of run ends ([`store::settle_many`]).
    pub settles: GroupWriter<SettleWriter>,
    /// Wakes the outbox dispatcher: a run's effects were written.
    pub outbox_wake: Arc<Notify>,
    pub runs: Mutex<HashMap<String, RunHandle>>,
    pub llm_in_flight: AtomicU32,
    /// When this instance's heartbeat last went through (epoch ms).
    pub heartbeat_ok_ms: AtomicI64,
    /// Reserved jobs claimed here and not ended: running, or held for a slot.
    pub reserved_in_flight: AtomicU32,
    /// The spending ceilings already told of in this life, by event id (stage-engine
    /// dedupes across lives and replicas; this spares the outbox a write per recheck).
    pub ceilings_told: Mutex<HashSet<String>>,
    /// Cancelled when the dispatcher stops for good.
    pub stopped: CancellationToken,
}

/// The queue's worker in this process. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    pub(crate) inner: Arc<Inner>,
}

/// Removes a run from the in-flight map when its task ends, however it ends (a panic
/// included), and wakes the dispatcher: a slot is free.
struct RunGuard {
    sup: Supervisor,
    id: String,
    attempt: u32,
    kind: Kind,
    ended: watch::Sender<bool>,
    slot_released: Arc<AtomicBool>,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let inner = &self.sup.inner;
        if let Ok(mut runs) = inner.runs.lock()
            && runs
                .get(&self.id)
                .is_some_and(|h| h.attempt == self.attempt)
        {
            runs.remove(&self.id);
        }
        self.sup.release_slot(self.kind, &self.slot_released);
        let _ = self.ended.send(true);
    }
}

/// Writes the ends of runs that finish meanwhile together ([`store::settle_many`]): the
/// queue's settles are group-committed, as the gateway's inbox records are.
pub struct SettleWriter {
    conn: tokio::sync::Mutex<HeldConnection>,
}

/// The most run ends in one statement (13 parameters each, far under both databases'
/// limits).
const SETTLE_BATCH: usize = 128;

impl BatchWrite for SettleWriter {
    type Item = SettleEntry;
    type Output = Option<JobRow>;

    async fn write(&self, items: &[SettleEntry]) -> Result<Vec<Option<JobRow>>, sqlx::Error> {
        let mut held = self.conn.lock().await;
        let out = match held.get().await {
            Ok(conn) => store::settle_many(conn, items).await,
            Err(e) => Err(e),
        };
        held.done(out.is_ok());
        out
    }
}

/// A connection kept between uses by one loop of the queue's hot path, sparing the pool's
/// checkout (and its ping) per statement — on PostgreSQL. SQLite's pool is its one writer
/// connection: there it goes back after every use. Dropped after an error, so that the next
/// use starts on a fresh one.
struct HeldConnection {
    db: Db,
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
}

impl HeldConnection {
    fn new(db: Db) -> Self {
        HeldConnection { db, conn: None }
    }

    async fn get(&mut self) -> Result<&mut sqlx::AnyConnection, sqlx::Error> {
        Ok(match &mut self.conn {
            Some(c) => c,
            slot @ None => slot.insert(self.db.pool.acquire().await?),
        })
    }

    /// After a use: whether it went well.
    fn done(&mut self, ok: bool) {
        if !ok || self.db.backend == orchestrator_kit::Backend::Sqlite {
            self.conn = None;
        }
    }
}

/// The breaker's answer to "may an LLM job be claimed now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Allowed,
    /// Half-open: exactly one LLM job may go, as the probe.
    Probe,
    Blocked,
}

impl Supervisor {
    pub fn new(
        db: Db,
        config: LauncherConfig,
        peers: Arc<dyn Peers>,
        workspace: Workspace,
        agent_env: AgentEnv,
    ) -> Self {
        let reserved_slots = Arc::new(Semaphore::new(config.reserved_concurrency as usize));
        let settles = GroupWriter::spawn(
            SettleWriter {
                conn: tokio::sync::Mutex::new(HeldConnection::new(db.clone())),
            },
            SETTLE_BATCH,
        );
        Supervisor {
            inner: Arc::new(Inner {
                db,
                config: Arc::new(config),
                peers,
                workspace,
                agent_env,
                wake: Notify::new(),
                reserved_wake: Notify::new(),
                reserved_slots,
                settles,
                outbox_wake: Arc::new(Notify::new()),
                runs: Mutex::new(HashMap::new()),
                llm_in_flight: AtomicU32::new(0),
                heartbeat_ok_ms: AtomicI64::new(now_ms()),
                reserved_in_flight: AtomicU32::new(0),
                ceilings_told: Mutex::new(HashSet::new()),
                stopped: CancellationToken::new(),
            }),
        }
    }

    pub fn config(&self) -> &LauncherConfig {
        &self.inner.config
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// Wakes both dispatchers (an enqueue, a job requeued).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
        self.inner.reserved_wake.notify_one();
    }

    /// The run no longer counts against this instance's claims: at the latest when its
    /// task ends; a reserved run as soon as its RPC has answered, so that the write of its
    /// end (group-committed) never holds up the next claim. Once per run.
    pub(crate) fn release_slot(&self, kind: Kind, released: &AtomicBool) {
        if released.swap(true, Ordering::SeqCst) {
            return;
        }
        match kind {
            Kind::Llm => self.inner.llm_in_flight.fetch_sub(1, Ordering::SeqCst),
            Kind::Reserved => self.inner.reserved_in_flight.fetch_sub(1, Ordering::SeqCst),
        };
        self.wake_kind(kind);
    }

    /// Wakes the dispatcher of one kind of job (its slot was freed).
    fn wake_kind(&self, kind: Kind) {
        match kind {
            Kind::Llm => self.inner.wake.notify_one(),
            Kind::Reserved => self.inner.reserved_wake.notify_one(),
        }
    }

    /// The handle of a run in flight here.
    pub fn handle(&self, job_id: &str) -> Option<RunHandle> {
        self.inner
            .runs
            .lock()
            .ok()
            .and_then(|r| r.get(job_id).cloned())
    }

    /// Runs in flight here: (job id, attempt).
    pub fn in_flight(&self) -> Vec<(String, u32)> {
        self.inner
            .runs
            .lock()
            .map(|r| r.iter().map(|(k, h)| (k.clone(), h.attempt)).collect())
            .unwrap_or_default()
    }

    /// A token cancelled once the dispatcher has stopped and handed its runs back.
    pub fn stopped(&self) -> CancellationToken {
        self.inner.stopped.clone()
    }

    /// The dispatcher of this launcher's outbox (the end of every run, toward the peers).
    pub fn outbox_dispatcher(&self) -> Dispatcher {
        Dispatcher {
            outbox: outbox::OUTBOX,
            // Stable across restarts of this replica; another replica's claims stay its own.
            claimant: self.config().instance_id.clone(),
            db: self.db().clone(),
            deliver: Arc::new(Delivery { sup: self.clone() }),
            config: self.config().outbox.clone(),
            notify: self.inner.outbox_wake.clone(),
        }
    }

    /// Registers this instance, reconciles what its previous life left running, then
    /// dispatches until `shutdown`; heartbeats and delivers the outbox alongside (what a
    /// previous life left pending included). Returns at once.
    pub fn start(&self, shutdown: CancellationToken) {
        tokio::spawn(self.outbox_dispatcher().run(shutdown.clone()));
        if self.db().backend == orchestrator_kit::Backend::Postgres {
            let me = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move { me.listen_for_jobs(stop).await });
        }
        if let Some(open_for) = self.config().notify_breaker_open {
            let me = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move { me.breaker_watch(open_for, stop).await });
        }
        let me = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let id = me.config().instance_id.clone();
            loop {
                match store::register_instance(me.db(), &id, &me.config().host, now_ms()).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(instance_id = id, error = %e, "cannot register the launcher instance; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = stop.cancelled() => { me.inner.stopped.cancel(); return; }
                        }
                    }
                }
            }
            me.inner.heartbeat_ok_ms.store(now_ms(), Ordering::SeqCst);
            tracing::info!(
                instance_id = id,
                host = me.config().host,
                "launcher instance started"
            );
            let hb = me.clone();
            let hb_stop = stop.clone();
            tokio::spawn(async move { hb.heartbeat_loop(hb_stop).await });
            me.reconcile().await;
            me.dispatch_loop(stop).await;
        });
    }

    /// PostgreSQL: wakes the dispatchers whenever any replica enqueues a job
    /// (`LISTEN launcher_jobs`), instead of leaving an idle replica to its poll. Lost
    /// notifications (a dropped connection) cost at most a poll; the listener reconnects.
    async fn listen_for_jobs(&self, stop: CancellationToken) {
        let url = self.db().pool.connect_options().database_url.to_string();
        let mut listener = loop {
            let attempt = async {
                let mut l = sqlx::postgres::PgListener::connect(&url).await?;
                l.listen(store::JOBS_CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            match attempt.await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for enqueued jobs; the poll wakes the dispatcher meanwhile");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(5)) => {}
                        () = stop.cancelled() => return,
                    }
                }
            }
        };
        loop {
            tokio::select! {
                got = listener.recv() => match got {
                    Ok(_) => self.wake(),
                    Err(e) => {
                        tracing::warn!(error = %e, "listening for enqueued jobs failed; reconnecting");
                        self.wake();
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = stop.cancelled() => return,
                        }
                    }
                },
                () = stop.cancelled() => return,
            }
        }
    }

    async fn dispatch_loop(&self, shutdown: CancellationToken) {
        // Reserved jobs have their own dispatcher: they never wait for an LLM slot, and
        // their claims (a batch at a time) never cost the LLM side a query.
        let me = self.clone();
        let stop = shutdown.clone();
        let reserved = tokio::spawn(async move { me.reserved_loop(stop).await });
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if let Err(e) = self.claim_llm().await {
                tracing::warn!(error = %e, "claiming jobs failed; retrying at the next poll");
            }
            let wait = self.next_wait().await;
            tokio::select! {
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => break,
            }
        }
        // No claim after the hand-back.
        let _ = reserved.await;
        self.drain().await;
        if let Err(e) = store::stop_instance(self.db(), &self.config().instance_id, now_ms()).await
        {
            tracing::warn!(error = %e, "cannot mark the launcher instance stopped");
        }
        self.inner.stopped.cancel();
        tracing::info!(instance_id = self.config().instance_id, "launcher stopped");
    }

    /// Claims reserved jobs a batch at a time: when the jobs claimed here and not ended
    /// fall to `ORCH_RESERVED_CONCURRENCY` + half of `ORCH_LAUNCHER_LOCAL_QUEUE`, as many as
    /// fill both; a run's end below that mark costs no query at all.
    async fn reserved_loop(&self, shutdown: CancellationToken) {
        let c = self.inner.config.clone();
        let capacity = c.reserved_concurrency + c.local_queue;
        let low_water = c.reserved_concurrency + c.local_queue / 2;
        let backend = self.db().backend;
        let mut conn = HeldConnection::new(self.db().clone());
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let in_flight = self.inner.reserved_in_flight.load(Ordering::SeqCst);
            let mut wait = c.poll;
            if in_flight <= low_water && !self.heartbeat_lost() {
                let room = capacity - in_flight;
                let claimed = match conn.get().await {
                    Ok(on) => {
                        store::claim_reserved(on, backend, &c.instance_id, now_ms(), room).await
                    }
                    Err(e) => Err(e),
                };
                conn.done(claimed.is_ok());
                match claimed {
                    Ok(jobs) => {
                        let full = jobs.len() == room as usize;
                        for job in jobs {
                            self.launch(job);
                        }
                        // Fewer than asked: the queue has nothing more runnable now, so
                        // sleep until the next job falls due.
                        if !full {
                            wait = self.next_wait().await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming reserved jobs failed; retrying at the next poll");
                    }
                }
            }
            tokio::select! {
                () = self.inner.reserved_wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
            // Let the runs just launched or woken take their turn first: a quick RPC is
            // over by then, and the next claim fills its slot too.
            tokio::task::yield_now().await;
        }
    }

    /// How long to sleep: the poll, or less when a queued job becomes runnable sooner.
    async fn next_wait(&self) -> Duration {
        let now = now_ms();
        let poll = self.config().poll;
        match store::next_due(self.db(), now).await {
            Ok(Some(at)) => Duration::from_millis(u64::try_from(at - now).unwrap_or(0)).min(poll),
            _ => poll,
        }
    }

    /// A half-open probe that has not reported by then was lost (its launcher died).
    fn probe_stale_before(&self, now: i64) -> i64 {
        let c = self.config();
        let longest = c
            .timeout_overrides
            .values()
            .copied()
            .chain([c.agent_timeout])
            .max()
            .unwrap_or(c.agent_timeout);
        let stale = i64::try_from((longest + c.kill_grace + Duration::from_secs(60)).as_millis())
            .unwrap_or(i64::MAX);
        now.saturating_sub(stale)
    }

    async fn gate(&self, now: i64) -> Result<Gate, sqlx::Error> {
        let b = store::breaker(self.db()).await?;
        Ok(match b.state.as_str() {
            "closed" => Gate::Allowed,
            "open" if now < b.open_until_ms => Gate::Blocked,
            "open" => Gate::Probe,
            "half_open" if b.probe_started_ms < self.probe_stale_before(now) => Gate::Probe,
            _ => Gate::Blocked,
        })
    }

    /// Claims LLM jobs while the breaker and the global `ORCH_MAX_CONCURRENCY` allow: as
    /// many as this instance and the global slots have room for, in one statement; the
    /// half-open breaker's probe goes alone.
    async fn claim_llm(&self) -> Result<(), sqlx::Error> {
        let c = self.inner.config.clone();
        let mut probed = false;
        loop {
            if self.inner.llm_in_flight.load(Ordering::SeqCst) >= c.max_concurrency
                || self.heartbeat_lost()
            {
                return Ok(());
            }
            let now = now_ms();
            match self.gate(now).await? {
                Gate::Blocked => return Ok(()),
                Gate::Probe if probed => return Ok(()),
                Gate::Probe => {
                    probed = true;
                    if !store::breaker_take_probe(self.db(), now, self.probe_stale_before(now))
                        .await?
                    {
                        continue;
                    }
                    let filter = ClaimFilter {
                        llm: true,
                        reserved: false,
                        max_concurrency: c.max_concurrency,
                    };
                    match store::claim(self.db(), &c.instance_id, now, filter).await? {
                        Some(job) => {
                            store::breaker_set_probe(self.db(), &job.id, now).await?;
                            tracing::info!(
                                job_id = job.id,
                                "circuit breaker half-open: one job goes as the probe"
                            );
                            self.launch(job);
                        }
                        None => store::breaker_set_probe(self.db(), "", now).await?,
                    }
                }
                Gate::Allowed => {
                    let room = c
                        .max_concurrency
                        .saturating_sub(self.inner.llm_in_flight.load(Ordering::SeqCst));
                    let jobs =
                        store::claim_llm(self.db(), &c.instance_id, now, c.max_concurrency, room)
                            .await?;
                    let all = jobs.len() == room as usize;
                    for job in jobs {
                        self.launch(job);
                    }
                    if !all {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Tracks a run handled here — claimed, or left running by this launcher's previous
    /// life and being reconciled — until the guard drops: meanwhile its handle makes
    /// `ProbeProcesses` answer ALIVE and the heartbeat loop refresh its job, so that the
    /// reaper does not race this launcher's own finalize; shutdown waits for it.
    fn track(&self, job: &JobRow) -> (RunHandle, RunGuard) {
        let (tx, rx) = watch::channel(false);
        let handle = RunHandle {
            attempt: job.attempt,
            kind: job.kind,
            pid: Arc::new(AtomicI32::new(0)),
            stop: CancellationToken::new(),
            stop_reason: Arc::new(Mutex::new(None)),
            ended: rx,
            slot_released: Arc::new(AtomicBool::new(false)),
            started: Arc::new(AtomicBool::new(false)),
        };
        match job.kind {
            Kind::Llm => self.inner.llm_in_flight.fetch_add(1, Ordering::SeqCst),
            Kind::Reserved => self.inner.reserved_in_flight.fetch_add(1, Ordering::SeqCst),
        };
        if let Ok(mut runs) = self.inner.runs.lock() {
            runs.insert(job.id.clone(), handle.clone());
        }
        let guard = RunGuard {
            sup: self.clone(),
            id: job.id.clone(),
            attempt: job.attempt,
            kind: job.kind,
            ended: tx,
            slot_released: handle.slot_released.clone(),
        };
        (handle, guard)
    }

    /// Starts the task of a claimed run.
    fn launch(&self, job: JobRow) {
        let (handle, guard) = self.track(&job);
        tracing::info!(
            job_id = job.id,
            attempt = job.attempt,
            agent = job.agent,
            work_item = job.work_item,
            "job claimed"
        );
        let me = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            match job.kind {
                Kind::Llm => me.run_llm(job, handle).await,
                Kind::Reserved => me.run_reserved(job, handle).await,
            }
        });
    }

    /// Ends run `job.attempt` as `end` decides (guarded), with no effect of its own; see
    /// [`Self::end_run_with`].
    pub(crate) async fn end_run(
        &self,
        job: &JobRow,
        end: End,
        exit_code: Option<i32>,
        qg_hook_blocks: Option<u32>,
    ) -> Option<JobRow> {
        self.end_run_with(job, end, exit_code, qg_hook_blocks, Vec::new())
            .await
    }

    /// Ends run `job.attempt` as `end` decides (guarded) and, in the same transaction, writes
    /// the run's `effects` on its peers to the outbox — plus, when the job ends failed for
    /// good, the failure comment and `ReportJobFailed`. Returns the job as written, or
    /// `None` when someone else ended that run first — the caller then does nothing more
    /// (its usage is still recorded: a run that happened is accounted for).
    pub(crate) async fn end_run_with(
        &self,
        job: &JobRow,
        end: End,
        exit_code: Option<i32>,
        qg_hook_blocks: Option<u32>,
        mut effects: Vec<Effect>,
    ) -> Option<JobRow> {
        let c = self.config();
        let limits = Limits {
            max_transient_attempts: c.max_transient_attempts,
            backoff_base: c.backoff_base,
            backoff_max: c.backoff_max,
        };
        let mut s = next_state(job, &end, limits, now_ms(), jitter());
        s.exit_code = exit_code;
        s.qg_hook_blocks = qg_hook_blocks;
        if s.status == Status::Failed {
            effects.extend(failure_effects(job, &s.outcome, &s.reason));
        }
        let written = loop {
            let entry = SettleEntry {
                id: job.id.clone(),
                attempt: job.attempt,
                settle: s.clone(),
                effects: effects.clone(),
            };
            match self.inner.settles.write(entry).await {
                Ok(w) => break w,
                Err(e) => {
                    // Storage trouble: the run's end must not be lost while we live.
                    tracing::warn!(job_id = job.id, error = %e, "cannot write the end of a run; retrying");
                    if self.inner.stopped.is_cancelled() {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        match &written {
            None => {
                tracing::info!(
                    job_id = job.id,
                    attempt = job.attempt,
                    "the run was ended by someone else; nothing more to do"
                );
                let usage: Vec<Effect> = effects
                    .into_iter()
                    .filter(|e| matches!(e, Effect::RecordRun { .. }))
                    .collect();
                for e in &usage {
                    self.write_effect(&job.work_item, e).await;
                }
            }
            Some(row) => {
                tracing::info!(
                    job_id = row.id,
                    attempt = row.attempt,
                    status = %row.status,
                    outcome = row.outcome,
                    reason = row.reason,
                    "run ended"
                );
                // A slot is free (and a requeued job claimable): claim now. The run's own
                // task wakes the dispatcher when it ends, but an end written for a run of
                // another instance (a flip, a cancel) or of a previous life has no task here.
                self.wake_kind(row.kind);
                if !effects.is_empty() {
                    self.inner.outbox_wake.notify_one();
                }
            }
        }
        written
    }

    /// Posts a comment through stage-engine, by this launcher's outbox (retried for as long
    /// as stage-engine is down; AddComment is idempotent on `key`); never fatal.
    pub(crate) async fn comment(&self, work_item: &str, html: &str, author: &str, key: &str) {
        let effect = Effect::Comment {
            html: html.to_owned(),
            author: author.to_owned(),
            idempotency_key: key.to_owned(),
        };
        self.write_effect(work_item, &effect).await;
    }

    /// Writes one effect to the outbox on its own (not part of a run's end) and wakes its
    /// dispatcher.
    pub(crate) async fn write_effect(&self, work_item: &str, effect: &Effect) {
        let written = async {
            let mut tx = self.db().pool.begin().await?;
            outbox::insert(&mut tx, work_item, effect).await?;
            tx.commit().await
        }
        .await;
        match written {
            Ok(()) => self.inner.outbox_wake.notify_one(),
            Err(e) => {
                tracing::warn!(work_item, kind = effect.kind(), error = %e, "cannot write an effect to the outbox")
            }
        }
    }

    async fn heartbeat_loop(&self, stop: CancellationToken) {
        let id = self.config().instance_id.clone();
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.config().heartbeat) => {}
                () = stop.cancelled() => return,
            }
            let now = now_ms();
            let beat = tokio::time::timeout(
                self.lost_after(),
                store::heartbeat_instance(self.db(), &id, now),
            )
            .await;
            let failed = match beat {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {:?}", self.lost_after())),
            };
            if let Some(error) = failed {
                tracing::warn!(error, "launcher heartbeat failed");
                if self.heartbeat_lost() {
                    self.hand_back_held();
                }
                continue;
            }
            if self.heartbeat_lost() {
                tracing::info!("launcher heartbeat back: claiming again");
                self.wake();
            }
            self.inner.heartbeat_ok_ms.store(now_ms(), Ordering::SeqCst);
            let runs = self.in_flight();
            if runs.is_empty() {
                continue;
            }
            match store::heartbeat_jobs(self.db(), &runs, now).await {
                Ok(alive) => {
                    for (job_id, attempt) in runs {
                        if alive.contains(&job_id) {
                            continue;
                        }
                        // Ended by someone else (a cancel or a flip through another
                        // replica): its process must not run on.
                        if let Some(h) = self.handle(&job_id)
                            && h.attempt == attempt
                            && !h.stop.is_cancelled()
                        {
                            tracing::info!(
                                job_id,
                                attempt,
                                "the run was ended elsewhere; stopping its process"
                            );
                            h.stop(StopReason::EndedElsewhere);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "job heartbeat failed"),
            }
        }
    }

    /// How long without a heartbeat that went through makes it lost: half of
    /// `ORCH_LAUNCHER_INSTANCE_STALE_MS`, so that this instance stops taking work well before
    /// the reaper may count it gone and take its runs back.
    fn lost_after(&self) -> Duration {
        self.config().instance_stale / 2
    }

    /// This instance's heartbeat is lost: it claims nothing, and hands back what it holds.
    pub(crate) fn heartbeat_lost(&self) -> bool {
        let since = now_ms() - self.inner.heartbeat_ok_ms.load(Ordering::SeqCst);
        u128::try_from(since).unwrap_or(0) > self.lost_after().as_millis()
    }

    /// The reserved jobs held here and not started go back to the queue (their runs end
    /// as `handed_back`, written when storage answers; if it never does, the reaper takes
    /// them back once this instance counts as gone, and the attempt guard refuses a late
    /// end).
    fn hand_back_held(&self) {
        let held: Vec<RunHandle> = self
            .inner
            .runs
            .lock()
            .map(|r| {
                r.values()
                    .filter(|h| {
                        h.kind == Kind::Reserved
                            && !h.started.load(Ordering::SeqCst)
                            && !h.stop.is_cancelled()
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if held.is_empty() {
            return;
        }
        tracing::warn!(
            jobs = held.len(),
            "launcher heartbeat lost: claiming nothing, handing the held jobs back"
        );
        for h in held {
            h.stop(StopReason::HeartbeatLost);
        }
    }

    /// At shutdown: stops every run here and hands its job back to the queue.
    async fn drain(&self) {
        let handles: Vec<RunHandle> = self
            .inner
            .runs
            .lock()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default();
        if handles.is_empty() {
            return;
        }
        tracing::info!(
            runs = handles.len(),
            "handing running jobs back to the queue"
        );
        for h in &handles {
            h.stop(StopReason::Shutdown);
        }
        for mut h in handles {
            let _ = tokio::time::timeout(Duration::from_secs(5), h.ended.wait_for(|e| *e)).await;
        }
    }

    /// Jobs this instance left running in a previous life: a process that is gone is
    /// finalized from its log at once (instead of waiting for the reaper); one still alive
    /// cannot be waited on by this new life, so its group is killed and the run ends as
    /// a permanent failure (the attempt rules decide on a retry).
    async fn reconcile(&self) {
        // The ceilings may have been raised (or lifted) since: the jobs waiting for one look
        // again now.
        match store::wake_queued_with_outcome(self.db(), crate::ceilings::OUTCOME, now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "jobs waiting for a spending ceiling look again"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot wake the jobs waiting for a spending ceiling")
            }
        }
        let me = &self.config().instance_id;
        let running = match store::running(self.db()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list running jobs for reconciliation");
                return;
            }
        };
        for job in running.into_iter().filter(|j| &j.instance_id == me) {
            if self.handle(&job.id).is_some() {
                continue;
            }
            tracing::info!(job_id = job.id, attempt = job.attempt, pid = ?job.pid, "reconciling a job left running by this launcher's previous life");
            let (_, guard) = self.track(&job);
            let me2 = self.clone();
            // One slow kill must not hold up the others, nor the dispatcher.
            tokio::spawn(async move {
                let _guard = guard;
                me2.reconcile_one(job).await;
            });
        }
    }

    async fn reconcile_one(&self, job: JobRow) {
        let pgid = job.pid.and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let alive = pgid > 1 && crate::proc::group_alive(pgid);
        if job.kind == Kind::Reserved {
            // Its RPC was cut off: call again.
            let end = End::Again {
                outcome: "handed_back",
                reason: "the launcher restarted while it ran".to_owned(),
                after: Duration::ZERO,
                bump: false,
            };
            self.end_run(&job, end, None, None).await;
            return;
        }
        if alive {
            crate::agent::kill_group(pgid, self.config().kill_grace, None).await;
            let end = End::Permanent {
                outcome: "orphaned",
                reason: "the launcher restarted while the agent ran; it was killed".to_owned(),
                retry: true,
            };
            self.end_run(&job, end, None, None).await;
            return;
        }
        // Gone: its log tells how it ended.
        self.finalize_orphan(job).await;
    }
}

/// What a job that ended failed for good tells the others: "<Role> failed: <reason>" on
/// the work item, and `StageEngine.ReportJobFailed` (the item parks as blocked).
pub(crate) fn failure_effects(job: &JobRow, outcome: &str, reason: &str) -> [Effect; 2] {
    let html = format!(
        "<p>{} failed (job {}, attempt {}): {}</p>",
        crate::run::role_title(&job.agent),
        html_escape(&job.id),
        job.attempt,
        html_escape(reason)
    );
    [
        Effect::Comment {
            html,
            author: comment_author(job).to_owned(),
            idempotency_key: format!("launcher:{}:{}:failed", job.id, job.attempt),
        },
        Effect::ReportJobFailed {
            job_id: job.id.clone(),
            attempt: job.attempt,
            agent: job.agent.clone(),
            dedupe_key: job_dedupe_key(job),
            outcome: outcome.to_owned(),
            reason: reason.to_owned(),
        },
    ]
}

/// The dedupe key the job was enqueued with: its own, else its payload's.
pub(crate) fn job_dedupe_key(job: &JobRow) -> String {
    job.dedupe_key.clone().unwrap_or_else(|| {
        serde_json::from_str::<serde_json::Value>(&job.payload_json)
            .ok()
            .and_then(|v| v["dedupe_key"].as_str().map(str::to_owned))
            .unwrap_or_default()
    })
}

/// The bot that posts about `job`: an agent's run speaks under the agent's own bot, a
/// reserved job (no agent of its own) under `stream`.
pub(crate) fn comment_author(job: &JobRow) -> &str {
    match job.kind {
        store::Kind::Llm => &job.agent,
        store::Kind::Reserved => "stream",
    }
}

/// Escapes text for the tracker's HTML comments.
pub(crate) fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}
