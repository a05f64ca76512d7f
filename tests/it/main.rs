//! Integration tests: the stack started in-process on port 0 (over real gRPC on loopback),
//! on SQLite and on PostgreSQL, and the `orchestrator` binary as a process.

mod common;

mod auth;
mod gateway;
mod process;
mod usage_ledger;
