//! A TOML file as the CMDB (development, the quickstart, and hosts without a CMDB).

use std::path::PathBuf;

use crate::{BoxFuture, Cmdb, CmdbError, ServiceIdentity};

pub struct FileCmdb {
    path: PathBuf,
}

impl FileCmdb {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    fn read(&self, vm: &str) -> Result<ServiceIdentity, CmdbError> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| CmdbError::Unreachable(format!("{}: {e}", self.path.display())))?;
        let id: ServiceIdentity = toml::from_str(&text).map_err(|e| {
            // Unknown keys are named in the message; wrong types are located by the span.
            let by_span = e.span().and_then(|sp| {
                let line_start = text[..sp.start].rfind('\n').map_or(0, |i| i + 1);
                let line = text[line_start..].lines().next()?;
                Some(line.split('=').next()?.trim().to_owned())
            });
            let field = e
                .message()
                .split('`')
                .nth(1)
                .map(str::to_owned)
                .or(by_span)
                .unwrap_or_else(|| "(record)".to_owned());
            CmdbError::Field {
                vm: vm.to_owned(),
                field,
                problem: format!("{}: {}", self.path.display(), e.message().trim()),
            }
        })?;
        id.check().map_err(|(field, problem)| CmdbError::Field {
            vm: vm.to_owned(),
            field: field.to_owned(),
            problem,
        })?;
        Ok(id)
    }
}

impl Cmdb for FileCmdb {
    fn identity<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, Result<ServiceIdentity, CmdbError>> {
        Box::pin(async move { self.read(vm) })
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("identity.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[tokio::test]
    async fn reads_the_design_example() {
        let (_d, p) = write("service = \"orders\"\nenvironment = \"prod\"\nzone = \"z1\"\nversion = \"v3\"\nweight = 100\ncolour = \"\"\nowner = \"team-a\"\n");
        let id = FileCmdb::new(p).identity("web-01").await.unwrap();
        assert_eq!(id.service, "orders");
        assert_eq!(id.weight, 100);
    }

    #[tokio::test]
    async fn wrong_types_and_unknown_keys_name_the_field() {
        let (_d, p) = write("service = \"orders\"\nenvironment = \"prod\"\nweight = \"heavy\"\n");
        match FileCmdb::new(p).identity("web-01").await {
            Err(CmdbError::Field { vm, field, .. }) => {
                assert_eq!(vm, "web-01");
                assert_eq!(field, "weight");
            }
            other => panic!("{other:?}"),
        }
        let (_d, p) = write("service = \"orders\"\nenvironment = \"prod\"\ncolor = \"red\"\n");
        assert!(
            matches!(FileCmdb::new(p).identity("v").await, Err(CmdbError::Field { field, .. }) if field == "color")
        );
    }

    #[tokio::test]
    async fn a_missing_file_is_an_outage() {
        let e = FileCmdb::new("/nonexistent/identity.toml")
            .identity("v")
            .await
            .unwrap_err();
        assert!(e.is_outage(), "{e}");
    }
}
