//! Reads this VM's service identity from a CMDB: Nautobot or NetBox (REST), a generic HTTP
//! JSON source, a TOML file, or environment variables (a Kubernetes pod). Every backend produces
//! the same [`ServiceIdentity`], and every failure is a typed [`CmdbError`] that names the VM
//! and, where one is at fault, the field.

mod env;
mod error;
mod fields;
mod file;
mod http_json;
mod identity;
mod mapping;
pub mod rest;

use std::future::Future;
use std::pin::Pin;

pub use env::EnvCmdb;
pub use error::CmdbError;
pub use fields::{CustomFields, FieldState, FieldType, WantedField, VM_TYPE};
pub use file::FileCmdb;
pub use http_json::HttpJsonCmdb;
pub use identity::ServiceIdentity;
pub use mapping::FieldMap;
pub use rest::{Flavor, RestCmdb, RestOptions};

/// A boxed future, so that backends can be used as `dyn Cmdb`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A source of service identities.
pub trait Cmdb: Send + Sync {
    /// The identity of the VM named `vm`.
    fn identity<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, Result<ServiceIdentity, CmdbError>>;

    /// A short description for logs and `/status`, e.g. `nautobot https://cmdb.example.com`.
    fn describe(&self) -> String;
}
