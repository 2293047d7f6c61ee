//! Merging the views of a service's sources into one endpoint list: sources in the configured
//! order, an address found by two sources keeps the first one's entry (so `sources = ["consul",
//! "kubernetes"]` with consul-k8s catalog sync turned on does not count a pod twice).

use std::collections::HashSet;
use std::net::SocketAddr;

use super::{Found, View};
use crate::balance::Source;

/// The merged endpoints with the source each was taken from.
pub fn merge<'a>(views: impl IntoIterator<Item = (Source, &'a View)>) -> Vec<(Found, Source)> {
    let mut seen: HashSet<SocketAddr> = HashSet::new();
    let mut out = Vec::new();
    for (source, view) in views {
        for f in view.endpoints.iter().flat_map(|e| e.iter()) {
            if seen.insert(f.address) {
                out.push((f.clone(), source));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn found(addr: &str, env: &str) -> Found {
        Found {
            address: addr.parse().unwrap(),
            weight: 100,
            env: env.into(),
            zone: String::new(),
            version: String::new(),
            colour: String::new(),
            ramp: None,
        }
    }

    fn view(f: Vec<Found>) -> View {
        View {
            endpoints: Some(Arc::new(f)),
            error: None,
            updated: Some(1),
        }
    }

    #[test]
    fn the_first_source_wins_a_duplicate_address() {
        let consul = view(vec![found("10.0.0.1:80", "vm"), found("10.1.0.1:80", "k8s")]);
        let kube = view(vec![found("10.1.0.1:80", "k8s"), found("10.1.0.2:80", "k8s")]);
        let unanswered = View::default();
        let m = merge([
            (Source::Consul, &consul),
            (Source::Kubernetes, &kube),
            (Source::Etcd, &unanswered),
        ]);
        let got: Vec<(String, Source)> = m.iter().map(|(f, s)| (f.address.to_string(), *s)).collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.1:80".into(), Source::Consul),
                ("10.1.0.1:80".into(), Source::Consul),
                ("10.1.0.2:80".into(), Source::Kubernetes),
            ]
        );
    }
}
