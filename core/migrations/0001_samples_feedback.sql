-- Portable SQL: runs unchanged on SQLite and PostgreSQL.
CREATE TABLE samples (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    group_index BIGINT NOT NULL,
    task TEXT NOT NULL,
    model_version TEXT NOT NULL,
    prompt TEXT NOT NULL,
    input_image_sha256 TEXT,
    params TEXT NOT NULL,
    seed BIGINT NOT NULL,
    output_text TEXT,
    output_image_sha256 TEXT,
    token_ids TEXT NOT NULL,
    logprobs TEXT NOT NULL,
    finish_reason TEXT,
    queue_ms BIGINT NOT NULL,
    compute_ms BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX samples_request_id ON samples (request_id);
CREATE INDEX samples_created_at ON samples (created_at);

CREATE TABLE feedback (
    id TEXT PRIMARY KEY,
    client_id TEXT UNIQUE,
    body_sha256 TEXT NOT NULL,
    sample_id TEXT NOT NULL REFERENCES samples (id),
    key TEXT NOT NULL,
    score DOUBLE PRECISION,
    value TEXT,
    comment TEXT,
    correction TEXT,
    source TEXT NOT NULL,
    user_id TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX feedback_sample_id ON feedback (sample_id);
CREATE INDEX feedback_created_at ON feedback (created_at);
