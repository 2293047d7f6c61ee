//! Secret files (registry, CMDB, admin and Kubernetes tokens): read in one place, trimmed, and
//! refused with the key that names them when unreadable or empty.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("{key}: cannot read {path}: {problem}")]
pub struct SecretError {
    pub key: String,
    pub path: String,
    pub problem: String,
}

/// The trimmed content of the secret file `path`, configured under `key`.
pub fn read_secret(key: &str, path: &Path) -> Result<String, SecretError> {
    let err = |problem: String| SecretError {
        key: key.to_owned(),
        path: path.display().to_string(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("the file is empty".into()));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_trimmed_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "  s3cret\n").unwrap();
        assert_eq!(read_secret("registry.token_file", &p).unwrap(), "s3cret");
        std::fs::write(&p, "\n").unwrap();
        let e = read_secret("registry.token_file", &p).unwrap_err().to_string();
        assert!(
            e.starts_with("registry.token_file: cannot read") && e.contains("empty"),
            "{e}"
        );
        let e = read_secret("agent.admin_token_file", &dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("agent.admin_token_file"), "{e}");
    }
}
