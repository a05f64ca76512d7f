//! The `orchestrator` binary's wiring: which parts run in this process, on which
//! listeners, over which storage. `up` and `serve` are the same code with a different
//! list of parts; the parts always talk to each other through their gRPC clients.

pub mod budget;
pub mod demo;
pub mod item;
pub mod node;

pub use node::{Node, NodeError};
