-- Portable SQL: runs unchanged on SQLite and PostgreSQL.
CREATE TABLE model_versions (
    id TEXT PRIMARY KEY,
    parent TEXT,
    job_id TEXT,
    checkpoint_path TEXT,
    metrics TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE rl_jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    trigger_reason TEXT NOT NULL,
    config TEXT NOT NULL,
    parent_version TEXT,
    candidate_version TEXT,
    data_counts TEXT,
    metrics TEXT,
    evaluation TEXT,
    error TEXT,
    steps_done BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX rl_jobs_status ON rl_jobs (status);
CREATE INDEX rl_jobs_created_at ON rl_jobs (created_at);

-- One row per setting; `active_version` names the version being served.
CREATE TABLE registry_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
