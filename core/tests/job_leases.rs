//! Jobs shared by several processes through one database: one active job
//! whoever submits it, a trigger fires once, a job is claimed once, and a
//! job whose worker stops renewing its lease ends failed, never stuck.
//! Two `Store` handles on one database stand for two processes: one SQLite
//! file, or a fresh PostgreSQL database when `ULM_TEST_DATABASE_URL` is set
//! (CI runs both).

use std::time::Duration;

use ulm_core::jobs::{JobRecord, JobStatus, JobTrigger, Transition};
use ulm_core::store::jobs::Lease;
use ulm_core::store::{now_ms, Store, StoreError};

fn queued(id: &str) -> JobRecord {
    JobRecord::queued(id.into(), JobTrigger::Api, serde_json::json!({}), now_ms())
}

async fn two_processes() -> (tempfile::TempDir, Store, Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = match std::env::var("ULM_TEST_DATABASE_URL") {
        Ok(base) => Some(fresh_postgres_database(&base).await),
        Err(_) => None,
    };
    let a = Store::open(dir.path(), url.as_deref(), None).await.unwrap();
    let b = Store::open(dir.path(), url.as_deref(), None).await.unwrap();
    (dir, a, b)
}

async fn fresh_postgres_database(base: &str) -> String {
    use sqlx::Connection;
    let name = format!("ulm_leases_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(base).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_is_active_and_a_trigger_fires_once_across_processes() {
    let (_dir, a, b) = two_processes().await;
    let (job_a, job_b) = (queued("a"), queued("b"));
    let (first, second) = tokio::join!(
        a.create_job(&job_a, Some("after:0")),
        b.create_job(&job_b, Some("after:0"))
    );
    assert!(
        first.is_ok() != second.is_ok(),
        "exactly one of two simultaneous submissions is queued: {first:?} {second:?}"
    );
    let winner = if first.is_ok() { "a" } else { "b" };
    let refused = b.create_job(&queued("c"), None).await;
    assert!(matches!(refused, Err(StoreError::JobActive(id)) if id == winner));

    // Once the job ended, the same trigger does not fire again; another does.
    let fail = Transition::Fail { error: "x".into() };
    assert!(a.transition_job(winner, &fail).await.unwrap());
    let again = b.create_job(&queued("d"), Some("after:0")).await;
    assert!(
        matches!(&again, Err(StoreError::TriggerFired(key)) if key == "after:0"),
        "{again:?}"
    );
    b.create_job(&queued("e"), Some("after:1")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_claimed_once_and_names_its_worker() {
    let (_dir, a, b) = two_processes().await;
    a.create_job(&queued("j"), None).await.unwrap();
    let (x, y) = tokio::join!(a.claim_next_job("wa"), b.claim_next_job("wb"));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert!(x.is_some() != y.is_some(), "claimed once: {x:?} {y:?}");
    let claimed = x.or(y).unwrap();
    assert_eq!(claimed.status, JobStatus::Running);
    assert!(claimed.started_at.is_some());
    let worker = claimed.worker.clone().unwrap();
    assert!(worker == "wa" || worker == "wb");
    assert!(a.claim_next_job("wa").await.unwrap().is_none());
    // Only the claiming worker holds the lease.
    let other = if worker == "wa" { "wb" } else { "wa" };
    assert_eq!(b.renew_lease("j", other).await.unwrap(), Lease::Lost);
    assert_eq!(b.renew_lease("j", &worker).await.unwrap(), Lease::Held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_worker_and_a_lapsed_lease_fails_the_job() {
    let (_dir, a, b) = two_processes().await;
    a.create_job(&queued("j"), None).await.unwrap();
    a.claim_next_job("wa").await.unwrap().unwrap();
    // A queued-only withdrawal does not touch a running job; the flag does.
    assert!(!b.transition_job("j", &Transition::Withdraw).await.unwrap());
    assert!(b.request_cancel("j").await.unwrap());
    assert_eq!(
        a.renew_lease("j", "wa").await.unwrap(),
        Lease::CancelRequested
    );

    // A lease renewed just now is kept; one older than the lease is not.
    assert_eq!(b.expire_leases(Duration::from_secs(60)).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(b.expire_leases(Duration::from_millis(10)).await.unwrap(), 1);
    let job = b.get_job("j").await.unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert!(job.error.unwrap().contains("lease"));
    assert!(job.finished_at.is_some());
    // The worker, if it was only slow, learns the job is gone.
    assert_eq!(a.renew_lease("j", "wa").await.unwrap(), Lease::Lost);
    assert!(!b.request_cancel("j").await.unwrap());
    // And the next job runs.
    b.create_job(&queued("next"), None).await.unwrap();
    let next = b.claim_next_job("wb").await.unwrap().unwrap();
    assert_eq!(next.id, "next");
}
