//! Integration tests: the stack started in-process on port 0 (over real gRPC on loopback),
//! on SQLite and on PostgreSQL, and the `orchestrator` binary as a process.

mod common;

mod auth;
mod budgets;
mod ci_gate;
mod dashboard;
mod demo;
mod deploy;
mod deploy_targets;
mod door;
mod e2e;
mod gateway;
mod inbox;
mod item;
mod launcher;
mod merge_gate;
mod notify;
mod plane;
mod post_deploy;
mod process;
mod procs;
mod qg_hook;
mod real_cli;
mod reaper_faults;
mod reconcile;
mod replicas;
mod retry_cancel;
pub mod reviews;
mod scripted_agent;
mod seams;
mod stage_engine;
mod staging_check;
mod usage_ledger;
mod webdriver;
