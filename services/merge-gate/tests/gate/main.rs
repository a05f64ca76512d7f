//! merge-gate against fakes at its process boundary (Gitea over HTTP, the launcher over
//! gRPC) and real git repositories on disk, on SQLite and on PostgreSQL.

mod fakes;
mod finalize;
mod leases;
mod mergeable;
