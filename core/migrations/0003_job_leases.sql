-- Portable SQL: runs unchanged on SQLite and PostgreSQL.
-- Several processes share the jobs. The one running a job names itself in
-- `worker` and renews `heartbeat_at`; a job whose heartbeat lapsed is failed
-- by whichever process sees it. A cancel asked of a job running elsewhere is
-- a flag its worker reads with its next heartbeat.
ALTER TABLE rl_jobs ADD COLUMN worker TEXT;
ALTER TABLE rl_jobs ADD COLUMN heartbeat_at BIGINT;
ALTER TABLE rl_jobs ADD COLUMN cancel_requested BIGINT NOT NULL DEFAULT 0;
-- A triggered job names the job it follows, so that processes seeing the
-- same trigger fire it once.
ALTER TABLE rl_jobs ADD COLUMN trigger_key TEXT;
CREATE UNIQUE INDEX rl_jobs_trigger_key ON rl_jobs (trigger_key);
-- At most one job queued, running or evaluating, whoever submits it.
CREATE UNIQUE INDEX rl_jobs_one_active ON rl_jobs ((0)) WHERE status IN ('queued', 'running', 'evaluating');
