//! Rust client for the ULM-R1 server. It will be generated from the committed
//! `openapi/openapi.json` once the HTTP API exists (issue 3).
