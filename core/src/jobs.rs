//! The life of an RL job, in one place. A job is queued, then running, then
//! evaluating, and ends promoted, rejected, failed or cancelled. Every
//! change of status is a [`Transition`] that names the statuses it may start
//! from; the store applies it as one conditional update (or, for a
//! promotion, in the transaction that records the new version), so a job
//! never moves along an edge that is not listed here.

use crate::stored_enum;

stored_enum! {
    /// Where a job is in its life.
    pub enum JobStatus {
        Queued,
        Running,
        Evaluating,
        Promoted,
        Rejected,
        Failed,
        Cancelled,
    }
}

impl JobStatus {
    /// The statuses of a job that has not ended.
    pub const ACTIVE: [JobStatus; 3] =
        [JobStatus::Queued, JobStatus::Running, JobStatus::Evaluating];

    /// Queued, running or evaluating.
    pub fn is_active(self) -> bool {
        Self::ACTIVE.contains(&self)
    }
}

stored_enum! {
    /// Why a job was started.
    pub enum JobTrigger {
        /// `POST /v1/rl/jobs`.
        Api,
        /// The scheduler's interval passed.
        Timer,
        /// Enough new feedback arrived.
        Feedback,
    }
}

/// A change of a job's status, with what it records.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Picked up by a scheduler: queued to running (records the start time).
    Start,
    /// Training ended; the candidate is being evaluated.
    Evaluate,
    /// The gate kept the active version.
    Reject { evaluation: serde_json::Value },
    /// The gate promoted the candidate (applied with the version's row).
    Promote {
        version: String,
        evaluation: serde_json::Value,
    },
    /// Something went wrong; the evaluation when there was one.
    Fail { error: String },
    /// Stopped on request; the evaluation when it had finished.
    Cancel {
        reason: String,
        evaluation: Option<serde_json::Value>,
    },
    /// A queued job withdrawn before any worker claimed it.
    Withdraw,
    /// The process running the job stopped renewing its lease (it died or
    /// hung): its in-memory policy is gone.
    Interrupt,
}

impl Transition {
    /// The statuses this transition may leave.
    pub fn from(&self) -> &'static [JobStatus] {
        use JobStatus::*;
        match self {
            Transition::Start => &[Queued],
            Transition::Evaluate => &[Running],
            // Evaluation may end before its progress message was recorded.
            Transition::Reject { .. } | Transition::Promote { .. } => &[Running, Evaluating],
            Transition::Fail { .. } | Transition::Cancel { .. } => &JobStatus::ACTIVE,
            Transition::Withdraw => &[Queued],
            Transition::Interrupt => &[Running, Evaluating],
        }
    }

    /// The status it leads to.
    pub fn to(&self) -> JobStatus {
        match self {
            Transition::Start => JobStatus::Running,
            Transition::Evaluate => JobStatus::Evaluating,
            Transition::Reject { .. } => JobStatus::Rejected,
            Transition::Promote { .. } => JobStatus::Promoted,
            Transition::Fail { .. } | Transition::Interrupt => JobStatus::Failed,
            Transition::Cancel { .. } | Transition::Withdraw => JobStatus::Cancelled,
        }
    }

    /// The message stored in the job's `error` field.
    pub fn error(&self) -> Option<String> {
        match self {
            Transition::Fail { error } => Some(error.clone()),
            Transition::Cancel { reason, .. } => Some(reason.clone()),
            Transition::Withdraw => Some("cancelled before it started".into()),
            Transition::Interrupt => Some(
                "interrupted: the process running it stopped renewing its lease (it stopped or hung)"
                    .into(),
            ),
            _ => None,
        }
    }

    /// The evaluation it records, if any.
    pub fn evaluation(&self) -> Option<&serde_json::Value> {
        match self {
            Transition::Reject { evaluation } | Transition::Promote { evaluation, .. } => {
                Some(evaluation)
            }
            Transition::Cancel { evaluation, .. } => evaluation.as_ref(),
            _ => None,
        }
    }
}

/// An RL job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub status: JobStatus,
    pub trigger: JobTrigger,
    pub config: serde_json::Value,
    pub parent_version: Option<String>,
    pub candidate_version: Option<String>,
    pub data_counts: Option<serde_json::Value>,
    pub metrics: Option<serde_json::Value>,
    pub evaluation: Option<serde_json::Value>,
    pub error: Option<String>,
    pub steps_done: i64,
    /// The process that claimed it (host, pid and a random tag).
    pub worker: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl JobRecord {
    /// A job just submitted: queued, nothing recorded yet.
    pub fn queued(
        id: String,
        trigger: JobTrigger,
        config: serde_json::Value,
        created_at: i64,
    ) -> Self {
        Self {
            id,
            status: JobStatus::Queued,
            trigger,
            config,
            parent_version: None,
            candidate_version: None,
            data_counts: None,
            metrics: None,
            evaluation: None,
            error: None,
            steps_done: 0,
            worker: None,
            created_at,
            started_at: None,
            finished_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transition_leaves_only_active_statuses_for_its_target() {
        let all = [
            Transition::Start,
            Transition::Evaluate,
            Transition::Reject {
                evaluation: serde_json::json!({}),
            },
            Transition::Promote {
                version: "v1".into(),
                evaluation: serde_json::json!({}),
            },
            Transition::Fail { error: "x".into() },
            Transition::Cancel {
                reason: "x".into(),
                evaluation: None,
            },
            Transition::Withdraw,
            Transition::Interrupt,
        ];
        for t in &all {
            assert!(t.from().iter().all(|s| s.is_active()), "{t:?}");
            assert!(!t.from().contains(&t.to()), "{t:?}");
        }
        let ends = all.iter().filter(|t| !t.to().is_active()).count();
        assert_eq!(ends, 6);
        for s in [
            "queued",
            "running",
            "evaluating",
            "promoted",
            "rejected",
            "failed",
            "cancelled",
        ] {
            assert_eq!(s.parse::<JobStatus>().unwrap().as_str(), s);
        }
        for s in ["api", "timer", "feedback"] {
            assert_eq!(s.parse::<JobTrigger>().unwrap().as_str(), s);
        }
    }
}
