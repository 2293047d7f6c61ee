//! The subset split of a route (a canary): a weighted choice among version subsets, on a
//! 100-slot smooth schedule so that `v2` at 10% is exact over every 100 requests. The balance
//! stage falls back to the rest of the set when the chosen subset has no usable endpoint.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One entry of `split = [{ version = "v2", weight = 10 }, { version = "v1", weight = 90 }]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// The endpoints' `version` label.
    pub version: String,
    /// Percent of the route's requests.
    pub weight: u32,
}

/// A compiled split.
#[derive(Debug)]
pub struct Split {
    versions: Vec<Arc<str>>,
    percents: Vec<u32>,
    schedule: Vec<u32>,
    next: AtomicUsize,
}

impl Split {
    pub fn new(entries: &[SplitConfig]) -> Self {
        let percents: Vec<u32> = entries.iter().map(|e| e.weight).collect();
        Self {
            versions: entries.iter().map(|e| Arc::from(e.version.as_str())).collect(),
            schedule: crate::balance::weighted::smooth_schedule(&percents),
            percents,
            next: AtomicUsize::new(0),
        }
    }

    /// The version the next request should go to.
    pub fn choose(&self) -> &str {
        let i = match self.schedule.len() {
            0 => 0,
            n => self.schedule[self.next.fetch_add(1, Ordering::Relaxed) % n] as usize,
        };
        self.versions.get(i).map_or("", |v| v)
    }

    /// `(version, percent)` of each entry, for `/clusters`.
    pub fn describe(&self) -> Vec<(Arc<str>, u32)> {
        self.versions
            .iter()
            .cloned()
            .zip(self.percents.iter().copied())
            .collect()
    }
}

/// Problems of a split: empty or duplicate versions, weights not summing to 100.
pub fn validate(key: &str, entries: &[SplitConfig]) -> Vec<(String, String)> {
    let mut p = Vec::new();
    if entries.is_empty() {
        return p;
    }
    let sum: u64 = entries.iter().map(|e| u64::from(e.weight)).sum();
    if sum != 100 {
        p.push((key.to_owned(), format!("weights sum to {sum}, not 100")));
    }
    for (i, e) in entries.iter().enumerate() {
        if e.version.is_empty() {
            p.push((format!("{key}[{i}].version"), "must not be empty".to_owned()));
        }
        if entries[..i].iter().any(|o| o.version == e.version) {
            p.push((
                format!("{key}[{i}].version"),
                format!("{:?} is listed twice", e.version),
            ));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(list: &[(&str, u32)]) -> Vec<SplitConfig> {
        list.iter()
            .map(|(v, w)| SplitConfig {
                version: (*v).to_owned(),
                weight: *w,
            })
            .collect()
    }

    #[test]
    fn ten_percent_is_exact_per_hundred() {
        let s = Split::new(&entries(&[("v2", 10), ("v1", 90)]));
        for _ in 0..3 {
            let v2 = (0..100).filter(|_| s.choose() == "v2").count();
            assert_eq!(v2, 10);
        }
    }

    #[test]
    fn bad_splits_are_named() {
        let p = validate("route[0].split", &entries(&[("v2", 10), ("v2", 80), ("", 5)]));
        let text = format!("{p:?}");
        assert!(text.contains("sum to 95"), "{text}");
        assert!(text.contains("listed twice"), "{text}");
        assert!(text.contains("route[0].split[2].version"), "{text}");
    }

    proptest::proptest! {
        #[test]
        fn any_valid_split_is_exact_over_its_schedule(a in 0u32..=100) {
            let s = Split::new(&entries(&[("a", a), ("b", 100 - a)]));
            let got = (0..100).filter(|_| s.choose() == "a").count();
            proptest::prop_assert_eq!(got as u32, a);
        }
    }
}
