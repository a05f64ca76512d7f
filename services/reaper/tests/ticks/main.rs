//! The reaper against a launcher, a stage-engine and a merge-gate faked at the gRPC
//! boundary (the generated server traits on 127.0.0.1:0), on SQLite and on PostgreSQL. The
//! same against the real launcher, with real processes and faults, is in the workspace's
//! `tests/it/reaper_faults`.

mod running;
mod tiers;
mod world;
