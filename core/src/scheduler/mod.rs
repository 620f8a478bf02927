//! The background scheduler: starts refinement jobs (on a timer, when enough
//! new feedback arrived, or on demand), one at a time, and carries each
//! through its life: queued, running (training off the async runtime while
//! serving goes on), evaluating, then promoted, rejected, failed or
//! cancelled. Jobs are rows in the store, so they survive restarts and any
//! process sharing the database sees them: a process that runs jobs claims
//! one at a time and renews a lease on it while it runs; every process
//! fails jobs whose lease lapsed, so a job whose worker died never stays
//! running.

pub mod config;
pub mod curves;
pub mod data;
pub mod gate;
pub mod job;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use ulm_model::ModelError;
use ulm_rl::{checkpoint, RlError};

use crate::jobs::{JobRecord, JobStatus, JobTrigger, Transition};
use crate::registry::{Registry, RegistryError};
use crate::store::jobs::{Lease, VersionRecord};
use crate::store::{now_ms, Store, StoreError};
use config::{ConfigError, JobConfig};
use job::{JobInputs, Progress, RunEnd, StepSummary};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Start a job when this long has passed since the last one.
    pub interval: Option<Duration>,
    /// Start a job when this many feedback items arrived since the last one.
    pub min_new_feedback: Option<u64>,
    /// Share of rated requests held out for evaluation.
    pub holdout_fraction: f64,
    /// How often triggers and the queue are looked at.
    pub poll: Duration,
    /// Configuration of jobs the scheduler starts itself.
    pub job_defaults: JobConfig,
    /// A running job whose worker renewed nothing for this long is failed.
    pub lease: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            interval: None,
            min_new_feedback: None,
            holdout_fraction: 0.2,
            poll: Duration::from_secs(1),
            job_defaults: JobConfig::default(),
            lease: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("invalid job configuration: {0}")]
    InvalidConfig(#[from] ConfigError),
    #[error("job {0} has already finished")]
    Finished(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a job failed; stored as its error message.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the stored job configuration does not parse: {0}")]
    Config(#[from] serde_json::Error),
    #[error("no evaluation data: the gate needs at least one held-out rated group with 2 or more scored samples ({0})")]
    NoEvaluationData(serde_json::Value),
    /// Rated groups that all hash into the held-out share stay held out, so
    /// that no later job's gate evaluates on data the model trained on.
    #[error("no training data: no rated served group outside the held-out share, reference answer or unrated prompt with a positive mix weight ({0})")]
    NoTrainingData(serde_json::Value),
    #[error("no training step could be applied (every step had a non-finite loss or gradient)")]
    NoStepApplied,
    #[error("training failed: {0}")]
    Training(#[from] RlError),
    #[error("the model failed: {0}")]
    Model(#[from] ModelError),
    #[error("the training thread stopped: {0}")]
    Thread(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What this process's scheduler loop does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerRole {
    /// Fires triggers, claims and runs jobs, and fails lapsed ones.
    RunJobs,
    /// Only fails jobs whose lease lapsed (serving replicas).
    WatchLeases,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    registry: Registry,
    config: SchedulerConfig,
    /// This process, as it names itself on the jobs it claims.
    worker: String,
    /// `<jobs_dir>/<job id>/` holds each finished job's metrics and curves.
    jobs_dir: PathBuf,
    /// The job this process runs now, and its cancel flag.
    running: Mutex<Option<(String, Arc<AtomicBool>)>>,
    wake: Notify,
    stopping: AtomicBool,
}

impl Scheduler {
    /// A scheduler that does nothing until [`Self::spawn`]; its first tick
    /// fails the jobs whose lease lapsed while no process watched.
    pub fn new(
        store: Store,
        registry: Registry,
        config: SchedulerConfig,
        jobs_dir: PathBuf,
    ) -> Self {
        let worker = format!(
            "{}-{}-{}",
            hostname(),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Self {
            inner: Arc::new(Inner {
                store,
                registry,
                config,
                worker,
                jobs_dir,
                running: Mutex::new(None),
                wake: Notify::new(),
                stopping: AtomicBool::new(false),
            }),
        }
    }

    /// The name this process gives itself on the jobs it claims.
    pub fn worker(&self) -> &str {
        &self.inner.worker
    }

    async fn expire_leases(&self) -> Result<(), StoreError> {
        let lapsed = self
            .inner
            .store
            .expire_leases(self.inner.config.lease)
            .await?;
        if lapsed > 0 {
            tracing::warn!(
                lapsed,
                "jobs whose worker stopped renewing its lease are marked failed"
            );
            metrics::counter!("ulm_rl_jobs_total", "status" => "failed").increment(lapsed);
        }
        Ok(())
    }

    /// Queues a job; refused while another is queued or running.
    pub async fn submit(
        &self,
        config: JobConfig,
        trigger: JobTrigger,
    ) -> Result<JobRecord, SchedulerError> {
        self.queue(config, trigger, None).await
    }

    /// Queues a job, once per `trigger_key` when one is given.
    async fn queue(
        &self,
        config: JobConfig,
        trigger: JobTrigger,
        trigger_key: Option<&str>,
    ) -> Result<JobRecord, SchedulerError> {
        config.validate()?;
        let job = JobRecord::queued(
            uuid::Uuid::new_v4().to_string(),
            trigger,
            serde_json::to_value(&config).unwrap_or_default(),
            now_ms(),
        );
        self.inner.store.create_job(&job, trigger_key).await?;
        tracing::info!(job = %job.id, trigger = trigger.as_str(), "job queued");
        self.inner.wake.notify_one();
        Ok(job)
    }

    /// Cancels a queued job at once, a running one before its next step:
    /// here when this process runs it, otherwise through a flag its worker
    /// reads when it renews its lease.
    pub async fn cancel(&self, id: &str) -> Result<JobRecord, SchedulerError> {
        let store = &self.inner.store;
        let job = store.get_job(id).await?;
        if !job.status.is_active() {
            return Err(SchedulerError::Finished(id.to_string()));
        }
        if let Some(flag) = self.running_flag(id) {
            flag.store(true, Ordering::SeqCst);
        } else if store.transition_job(id, &Transition::Withdraw).await? {
            metrics::counter!("ulm_rl_jobs_total", "status" => "cancelled").increment(1);
        } else if let Some(flag) = self.running_flag(id) {
            // This process claimed it between the two looks.
            flag.store(true, Ordering::SeqCst);
        } else if !store.request_cancel(id).await? {
            // It ended meanwhile.
            return Err(SchedulerError::Finished(id.to_string()));
        }
        Ok(store.get_job(id).await?)
    }

    /// The cancel flag of `id` when this process runs it now.
    fn running_flag(&self, id: &str) -> Option<Arc<AtomicBool>> {
        let running = self.inner.running.lock().ok()?;
        running
            .as_ref()
            .filter(|(job, _)| job == id)
            .map(|(_, flag)| flag.clone())
    }

    /// Does `role`'s work until [`Self::stop`].
    pub fn spawn(&self, role: SchedulerRole) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            while !this.inner.stopping.load(Ordering::SeqCst) {
                if let Err(error) = this.tick(role).await {
                    tracing::error!(%error, "scheduler tick failed");
                }
                tokio::select! {
                    _ = this.inner.wake.notified() => {}
                    _ = tokio::time::sleep(this.inner.config.poll) => {}
                }
            }
        })
    }

    /// Cancels the running job (it is recorded as cancelled) and stops.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        if let Ok(running) = self.inner.running.lock() {
            if let Some((_, flag)) = running.as_ref() {
                flag.store(true, Ordering::SeqCst);
            }
        }
        self.inner.wake.notify_one();
    }

    async fn tick(&self, role: SchedulerRole) -> Result<(), StoreError> {
        self.expire_leases().await?;
        if role == SchedulerRole::WatchLeases {
            return Ok(());
        }
        self.maybe_trigger().await?;
        if let Some(job) = self.inner.store.claim_next_job(&self.inner.worker).await? {
            self.run(job).await;
        }
        Ok(())
    }

    async fn maybe_trigger(&self) -> Result<(), StoreError> {
        let c = &self.inner.config;
        if c.interval.is_none() && c.min_new_feedback.is_none() {
            return Ok(());
        }
        let store = &self.inner.store;
        let last = store.last_job_created_at().await?;
        let trigger = if c
            .interval
            .is_some_and(|i| now_ms() - last >= i.as_millis() as i64)
        {
            Some(JobTrigger::Timer)
        } else {
            match c.min_new_feedback {
                Some(k) if store.feedback_count_since(last).await? >= k as i64 => {
                    Some(JobTrigger::Feedback)
                }
                _ => None,
            }
        };
        if let Some(trigger) = trigger {
            // Processes that see the same trigger name the same job after
            // `last`: the database keeps one.
            let key = format!("after:{last}");
            match self
                .queue(c.job_defaults.clone(), trigger, Some(&key))
                .await
            {
                Ok(_)
                | Err(SchedulerError::Store(
                    StoreError::JobActive(_) | StoreError::TriggerFired(_),
                )) => {}
                Err(SchedulerError::Store(e)) => return Err(e),
                Err(e) => tracing::error!(error = %e, "the scheduler's job defaults are invalid"),
            }
        }
        Ok(())
    }

    async fn run(&self, job: JobRecord) {
        let cancel = Arc::new(AtomicBool::new(false));
        if let Ok(mut running) = self.inner.running.lock() {
            *running = Some((job.id.clone(), cancel.clone()));
        }
        if self.inner.stopping.load(Ordering::SeqCst) {
            cancel.store(true, Ordering::SeqCst);
        }
        let started = Instant::now();
        let result = self.run_job(&job, cancel).await;
        if let Ok(mut running) = self.inner.running.lock() {
            *running = None;
        }
        let status = match result {
            // It was no longer queued, or it was ended elsewhere.
            Ok(None) => return,
            Ok(Some(status)) => status,
            Err(error) => {
                tracing::error!(job = %job.id, %error, "job failed");
                let fail = Transition::Fail {
                    error: error.to_string(),
                };
                if let Err(e) = self.inner.store.transition_job(&job.id, &fail).await {
                    tracing::error!(job = %job.id, error = %e, "recording the failure failed");
                }
                JobStatus::Failed
            }
        };
        self.write_job_files(&job.id).await;
        tracing::info!(job = %job.id, status = status.as_str(), seconds = started.elapsed().as_secs_f64(), "job finished");
        metrics::counter!("ulm_rl_jobs_total", "status" => status.as_str()).increment(1);
        metrics::histogram!("ulm_rl_job_duration_seconds", "status" => status.as_str())
            .record(started.elapsed().as_secs_f64());
    }

    /// The ended job's metrics and curves as files; a failure to write
    /// them is logged (the job's record holds the same numbers).
    async fn write_job_files(&self, job: &str) {
        let metrics = match self.inner.store.get_job(job).await {
            Ok(record) => record.metrics,
            Err(error) => {
                tracing::warn!(job, %error, "reading the job's metrics failed");
                return;
            }
        };
        let Some(metrics) = metrics else { return };
        let dir = self.inner.jobs_dir.join(job);
        let written = tokio::task::spawn_blocking(move || curves::write_job_files(&dir, &metrics))
            .await
            .map_err(std::io::Error::other)
            .flatten();
        if let Err(error) = written {
            tracing::warn!(job, %error, "writing the job's curves failed");
        }
    }

    /// Ends `job` with `transition`; the status it ended in, none when it
    /// had already ended.
    async fn end(&self, job: &str, transition: Transition) -> Result<Option<JobStatus>, JobError> {
        let moved = self.inner.store.transition_job(job, &transition).await?;
        Ok(moved.then(|| transition.to()))
    }

    async fn on_progress(&self, job: &str, progress: Progress, steps: &mut Vec<StepSummary>) {
        match progress {
            Progress::Step(summary) => {
                metrics::counter!("ulm_rl_training_steps_total").increment(1);
                steps.push(summary);
                self.record_progress(job, steps).await;
            }
            Progress::Evaluating => {
                if let Err(error) = self
                    .inner
                    .store
                    .transition_job(job, &Transition::Evaluate)
                    .await
                {
                    tracing::warn!(job, %error, "recording the evaluation phase failed");
                }
            }
        }
    }

    /// Per-step metrics so far, on the job's record.
    async fn record_progress(&self, job: &str, steps: &[StepSummary]) {
        let metrics = serde_json::json!({ "steps": steps });
        let recorded = self
            .inner
            .store
            .set_job_progress(job, steps.len() as i64, &metrics)
            .await;
        if let Err(e) = recorded {
            tracing::warn!(job, error = %e, "recording progress failed");
        }
    }

    /// Renews the lease on `job`; a cancel asked elsewhere, or a job that
    /// ended elsewhere, raises `cancel`.
    async fn renew_lease(&self, job: &str, cancel: &AtomicBool) {
        match self.inner.store.renew_lease(job, &self.inner.worker).await {
            Ok(Lease::Held) => {}
            Ok(Lease::CancelRequested) => cancel.store(true, Ordering::SeqCst),
            Ok(Lease::Lost) => {
                tracing::warn!(job, "the job ended elsewhere; stopping it here");
                cancel.store(true, Ordering::SeqCst);
            }
            Err(error) => tracing::warn!(job, %error, "renewing the job's lease failed"),
        }
    }

    /// The claimed job to the end of its life: the status it ended in,
    /// none when it ended elsewhere.
    async fn run_job(
        &self,
        job: &JobRecord,
        cancel: Arc<AtomicBool>,
    ) -> Result<Option<JobStatus>, JobError> {
        let store = &self.inner.store;
        let registry = &self.inner.registry;
        let config: JobConfig = serde_json::from_value(job.config.clone())?;
        let active = registry.serving();
        let parent = store.get_version(&active.version).await?;
        store.set_job_parent(&job.id, &parent.id).await?;
        let base = registry.base();
        let shape = data::Shape {
            image_tokens: base.model.cfg.gen_vision.image_tokens(),
            input_images: base.image_processor.clone(),
            sampling_temperature: base.sampling.temperature,
        };
        let holdout = self.inner.config.holdout_fraction;
        let data = data::gather(store, &config, holdout, job.created_at, shape).await?;
        let counts = job::data_counts(&data);
        store.set_job_data_counts(&job.id, &counts).await?;
        if data.eval.is_empty() {
            return Err(JobError::NoEvaluationData(counts));
        }
        let parent_checkpoint = match &parent.checkpoint_path {
            Some(checkpoint) => Some(registry.checkpoint_dir(checkpoint).await?),
            None => None,
        };
        let inputs = JobInputs {
            base: registry.base().clone(),
            parent_checkpoint,
            active: active.clone(),
            config: config.clone(),
            data,
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let flag = cancel.clone();
        let mut training = tokio::task::spawn_blocking(move || job::run(inputs, &flag, &tx));
        let mut steps: Vec<StepSummary> = Vec::new();
        let mut heartbeat =
            tokio::time::interval((self.inner.config.lease / 4).max(Duration::from_millis(100)));
        let end = loop {
            tokio::select! {
                Some(progress) = rx.recv() => self.on_progress(&job.id, progress, &mut steps).await,
                _ = heartbeat.tick() => self.renew_lease(&job.id, &cancel).await,
                joined = &mut training => break joined,
            }
        };
        // Progress sent just before the end.
        while let Ok(progress) = rx.try_recv() {
            self.on_progress(&job.id, progress, &mut steps).await;
        }
        let trained = match end?? {
            RunEnd::Cancelled => {
                let reason = format!("cancelled after {} steps", steps.len());
                let cancel = Transition::Cancel {
                    reason,
                    evaluation: None,
                };
                return self.end(&job.id, cancel).await;
            }
            RunEnd::Trained(trained) => trained,
        };
        let eval = &trained.evaluation;
        metrics::gauge!("ulm_rl_eval_reward", "policy" => "active").set(eval.active.reward);
        metrics::gauge!("ulm_rl_eval_reward", "policy" => "candidate").set(eval.candidate.reward);
        metrics::gauge!("ulm_rl_eval_kl_to_base").set(eval.candidate.kl_to_base);
        let bounds = gate::Bounds {
            max_reward_drop: config.max_reward_drop,
            max_kl: config.max_kl,
            min_effective_share: config.min_effective_share,
        };
        let decision = gate::decide(eval, bounds);
        metrics::gauge!("ulm_rl_eval_effective_share", "policy" => "candidate")
            .set(eval.candidate.effective_share);
        let evaluation = serde_json::json!({
            "evaluation": eval,
            "decision": decision,
            "max_reward_drop": config.max_reward_drop,
            "max_kl": config.max_kl,
            "min_effective_share": config.min_effective_share,
            "judged_by": config.gate_feedback_keys.as_ref().or(config.feedback_keys.as_ref()),
        });
        if cancel.load(Ordering::SeqCst) {
            let cancel = Transition::Cancel {
                reason: "cancelled during evaluation".into(),
                evaluation: Some(evaluation),
            };
            return self.end(&job.id, cancel).await;
        }
        if !decision.promote {
            tracing::info!(job = %job.id, verdict = ?decision.verdict, reason = %decision.reason, "candidate rejected");
            return self.end(&job.id, Transition::Reject { evaluation }).await;
        }
        // The checkpoint is in the blob store before any row names it.
        let staging = registry.staging_dir(&job.id);
        let written = staging.clone();
        tokio::task::spawn_blocking(move || {
            checkpoint::save(&trained.trainer, &written, None, &[])
        })
        .await??;
        let published = registry.publish(&staging).await?;
        let version = registry.next_version_id().await?;
        let record = VersionRecord {
            id: version.clone(),
            parent: Some(parent.id.clone()),
            job_id: Some(job.id.clone()),
            checkpoint_path: Some(published),
            metrics: evaluation.clone(),
            created_at: now_ms(),
        };
        let serving = registry.load(&record).await?;
        registry.promote(&record, &evaluation, serving).await?;
        tracing::info!(job = %job.id, version, reason = %decision.reason, "candidate promoted");
        metrics::counter!("ulm_rl_promotions_total").increment(1);
        Ok(Some(JobStatus::Promoted))
    }
}

/// The machine's name, for the worker name on claimed jobs.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}
