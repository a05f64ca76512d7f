//! Checks on the opaque ids from a webhook that reach an id column. Repository and branch
//! names are checked by the git layer's one rule (`orchestrator_git::validate_repo`,
//! `validate_branch`), so a delivery the gateway accepts is one the git layer accepts.

/// An opaque id from outside (a delivery id, a Plane uuid): 1 to 128 printable ASCII
/// characters without spaces.
pub fn opaque_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("empty");
    }
    if id.len() > 128 {
        return Err("longer than 128 characters");
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("only printable ASCII without spaces is allowed");
    }
    if id.starts_with('-') {
        return Err("starts with '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_ids() {
        assert_eq!(opaque_id("9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d"), Ok(()));
        for bad in ["", "a b", "-x", "\u{7f}", "é", &"x".repeat(129)] {
            assert!(opaque_id(bad).is_err(), "{bad:?}");
        }
    }
}
