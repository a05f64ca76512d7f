//! `ListArtifacts`: the artifacts the quality gates read, for people (the dashboard's item
//! page). Which files a stage writes is the `QG_CHECKS` registry's `Input::Artifact`s; where
//! a person reads one is the forge's `file_url`; the local forge, whose `file://` pages a
//! browser cannot open, gives the text itself.

use orchestrator_forge::{ForgeKind, RepoName};

use crate::engine::{Engine, required};
use crate::error::EngineError;
use crate::pipeline::Stage;
use crate::qg::{Input, artifacts_dir, checks_for};
use crate::store;

/// The longest text given back; more is cut (on a character boundary) and marked.
pub const MAX_CONTENT_BYTES: usize = 200_000;

/// One artifact as `ListArtifacts` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactView {
    pub stage: Stage,
    pub name: &'static str,
    pub path: String,
    pub url: String,
    /// The text, when read (the local forge): `Some(None)` when the branch has no such file.
    pub content: Option<Option<String>>,
}

impl Engine {
    /// The artifacts of every stage up to the item's current one, in pipeline order.
    pub async fn list_artifacts(&self, key: &str) -> Result<Vec<ArtifactView>, EngineError> {
        let key = required("work_item", key)?;
        let item = store::get(&self.db, key)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("work item {key} not found")))?;
        let repo = RepoName::parse(&item.repo).map_err(|e| EngineError::InvalidField {
            field: "repo",
            reason: e.to_string(),
        })?;
        let read = self.forge.kind() == ForgeKind::Local;
        let mut out = Vec::new();
        for stage in Stage::ALL.into_iter().take_while(|s| *s <= item.stage) {
            for check in checks_for(stage) {
                let Input::Artifact(name) = check.input else {
                    continue;
                };
                let path = format!("{}/{name}", artifacts_dir(&item.key));
                let content = if read {
                    let text = self
                        .forge
                        .read_file(&repo, &item.branch, &path)
                        .await
                        .map_err(|e| {
                            if e.is_transient() {
                                EngineError::Unavailable(format!(
                                    "the forge is unavailable (reading {path}): {e}"
                                ))
                            } else {
                                EngineError::Precondition(format!(
                                    "the forge refused reading {path}: {e}"
                                ))
                            }
                        })?;
                    Some(text.map(cut))
                } else {
                    None
                };
                out.push(ArtifactView {
                    stage,
                    name,
                    url: self.forge.file_url(&repo, &item.branch, &path),
                    path,
                    content,
                });
            }
        }
        Ok(out)
    }
}

/// `text` kept to [`MAX_CONTENT_BYTES`], on a character boundary, marked when cut.
fn cut(mut text: String) -> String {
    if text.len() > MAX_CONTENT_BYTES {
        let mut at = MAX_CONTENT_BYTES;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
        text.push_str("\n[… cut at 200000 bytes]");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_cut_on_a_character_boundary() {
        assert_eq!(cut("short".into()), "short");
        let long = "é".repeat(MAX_CONTENT_BYTES); // 2 bytes each
        let c = cut(long);
        assert!(c.ends_with("[… cut at 200000 bytes]"), "marked");
        assert!(c.len() < MAX_CONTENT_BYTES + 40);
    }
}
