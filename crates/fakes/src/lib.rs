//! Faithful fakes of the services at the orchestrator's process boundary, for tests: ONE
//! fake Plane and ONE fake Gitea, built from `shared/contracts` field for field, that real
//! clients (the tracker and forge crates, git, the gateway's webhook endpoints) talk to over
//! real HTTP on loopback.
//!
//! - [`plane::FakePlane`]: Plane's REST API v1 (`X-API-Key`, projects, states, work items,
//!   comments, paginated lists) and its signed webhooks.
//! - [`gitea::FakeGitea`]: Gitea's REST API v1 (`Authorization: token`, repositories, pull
//!   requests, merges with their documented status codes, file contents), git over smart
//!   HTTP through the real `git http-backend` against bare repositories on disk, and its
//!   signed webhooks (a merge sends `pull_request` `closed` with `merged: true`).
//! - [`json::Json`]: JSON that keeps its key order, written as Python's `json.dumps`
//!   (Plane's body) or Go's `json.MarshalIndent` (Gitea's), so signatures cover exactly
//!   what a real sender sends.

pub mod gitea;
pub mod json;
pub mod plane;
pub mod webhook;

pub use json::Json;
pub use webhook::{Delivery, Hook};
