//! What every part that touches git shares: the validation of names that come from
//! outside (work item keys, repos, branches) and a git runner that takes an argument
//! vector — never a shell — and refuses arguments that could be read as options.

pub mod runner;
pub mod validate;

pub use runner::{Git, GitError, GitOutput, MergeTree};
pub use validate::{
    InvalidName, RepoName, is_commit_id, validate_branch, validate_path, validate_repo,
    validate_work_item_key,
};
