//! The reaper against a launcher, a stage-engine and a merge-gate faked at the gRPC
//! boundary (the generated server traits on 127.0.0.1:0), on SQLite and on PostgreSQL.

mod race;
mod running;
mod tiers;
mod world;
