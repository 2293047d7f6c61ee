//! Field names seen before, kept per thread: a head's field name is looked up here (FxHash over
//! its bytes as they came) and cloned, instead of being parsed by `HeaderName::from_bytes`,
//! which copies every name that is not one of the standard ones into a new allocation (a
//! `traceparent`, `x-request-id` or `x-b3-traceid` allocated and freed on every message). The
//! server's request parser uses it, and the upstream client when it puts a response's fields
//! into a map.
//!
//! Bounded: at most [`MAX_NAMES`] names of at most [`MAX_NAME_LEN`] bytes per thread; once full,
//! new names are parsed as before (a client that sends random names fills it once and gains
//! nothing after).

use std::cell::RefCell;

use http::header::{HeaderName, InvalidHeaderName};
use rustc_hash::FxHashMap;

/// Names kept per thread.
pub const MAX_NAMES: usize = 256;
/// Longer names are parsed every time.
pub const MAX_NAME_LEN: usize = 64;

thread_local! {
    static NAMES: RefCell<FxHashMap<Box<[u8]>, HeaderName>> = RefCell::new(FxHashMap::default());
}

/// The field name `raw` (as it came on the wire, any case), as `HeaderName::from_bytes` makes it.
pub fn name(raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    if raw.len() > MAX_NAME_LEN {
        return HeaderName::from_bytes(raw);
    }
    let kept = NAMES.with(|names| names.try_borrow().ok().and_then(|n| n.get(raw).cloned()));
    if let Some(name) = kept {
        return Ok(name);
    }
    let name = HeaderName::from_bytes(raw)?;
    NAMES.with(|names| {
        if let Ok(mut names) = names.try_borrow_mut() {
            if names.len() < MAX_NAMES {
                names.insert(raw.into(), name.clone());
            }
        }
    });
    Ok(name)
}

#[cfg(test)]
mod tests {
    use http::header;

    use super::*;

    fn kept() -> usize {
        NAMES.with(|n| n.borrow().len())
    }

    #[test]
    fn a_name_comes_back_as_from_bytes_makes_it_in_any_case() {
        // (Each test runs on its own thread: the cache starts empty.)
        for raw in [
            "Host",
            "host",
            "X-B3-TraceId",
            "x-b3-traceid",
            "traceparent",
            "Content-Length",
        ] {
            for _ in 0..2 {
                assert_eq!(
                    name(raw.as_bytes()).unwrap(),
                    HeaderName::from_bytes(raw.as_bytes()).unwrap()
                );
            }
        }
        assert_eq!(name(b"CONTENT-length").unwrap(), header::CONTENT_LENGTH);
        assert_eq!(kept(), 7);
    }

    #[test]
    fn invalid_and_long_names_are_refused_or_parsed_and_never_kept() {
        assert!(name(b"bad name").is_err());
        assert!(name(b"").is_err());
        assert!(name("caf\u{e9}".as_bytes()).is_err());
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert_eq!(name(long.as_bytes()).unwrap().as_str(), long);
        assert_eq!(kept(), 0);
    }

    #[test]
    fn the_cache_stops_growing_at_its_bound() {
        for i in 0..MAX_NAMES + 50 {
            let raw = format!("x-field-{i}");
            assert_eq!(name(raw.as_bytes()).unwrap().as_str(), raw);
        }
        assert_eq!(kept(), MAX_NAMES);
        // Past the bound, names are still right.
        assert_eq!(name(b"x-late").unwrap().as_str(), "x-late");
    }
}
