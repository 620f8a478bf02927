-- Portable SQL: runs unchanged on SQLite and PostgreSQL.
-- Images are drawn from the guided (CFG) distribution while `logprobs`
-- holds the conditional ones GRPO trains. The gate's importance weights
-- need the distribution a sample was drawn from. Rows stored before hold
-- '[]': their image groups are left out of evaluations, counted.
ALTER TABLE samples ADD COLUMN guided_logprobs TEXT NOT NULL DEFAULT '[]';
