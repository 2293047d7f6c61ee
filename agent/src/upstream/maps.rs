//! Emptied `HeaderMap`s kept per thread for the next message's head, so that a request and its
//! response do not each allocate and free a map (two allocations apiece: the index and the
//! entries). The server's request parser takes from here (the upstream client keeps a response's
//! fields as they came: `h1::head::RawFields`); the request path gives a map back once the
//! message is done with it. A map that grew
//! past [`MAX_FIELDS`] is freed, and at most [`KEEP`] are kept per thread (a few hundred KiB at
//! most; a thread that only takes allocates as before).

use std::cell::RefCell;

use http::HeaderMap;

/// Maps kept per thread.
pub const KEEP: usize = 64;
/// Every map has room for this many fields at least: requests and responses take from the same
/// pool in any order, and a map too small for the next head would be grown (reallocated).
pub const MIN_FIELDS: usize = 12;
/// A map that can hold more fields than this is not kept.
pub const MAX_FIELDS: usize = 48;

thread_local! {
    static MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map with room for `fields` fields: an emptied one of this thread's, else a new one.
pub fn take(fields: usize) -> HeaderMap {
    let fields = fields.max(MIN_FIELDS);
    let kept = MAPS.with(|m| m.try_borrow_mut().ok().and_then(|mut m| m.pop()));
    match kept {
        Some(mut map) => {
            // A no-op when the map holds that many already.
            map.reserve(fields);
            map
        }
        None => HeaderMap::with_capacity(fields),
    }
}

/// Empties `map` and keeps it for [`take`], unless it never allocated, grew too large, or the
/// thread keeps enough already.
pub fn give(mut map: HeaderMap) {
    let cap = map.capacity();
    if cap == 0 || cap > MAX_FIELDS {
        return;
    }
    map.clear();
    MAPS.with(|m| {
        if let Ok(mut m) = m.try_borrow_mut() {
            if m.len() < KEEP {
                m.push(map);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use http::header::HOST;

    use super::*;

    fn kept() -> usize {
        MAPS.with(|m| m.borrow().len())
    }

    #[test]
    fn a_map_given_back_comes_back_empty_with_its_room() {
        // (Each test runs on its own thread: the pool starts empty.)
        let mut map = take(4);
        map.insert(HOST, "a".parse().unwrap());
        let cap = map.capacity();
        give(map);
        assert_eq!(kept(), 1);
        let again = take(2);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), cap);
        assert_eq!(kept(), 0);
        // More room than it has: grown, still usable.
        give(again);
        let bigger = take(40);
        assert!(bigger.capacity() >= 40);
    }

    #[test]
    fn large_maps_and_maps_past_the_keep_limit_are_freed() {
        give(HeaderMap::with_capacity(MAX_FIELDS * 2));
        give(HeaderMap::new());
        assert_eq!(kept(), 0);
        for _ in 0..KEEP + 5 {
            give(HeaderMap::with_capacity(8));
        }
        assert_eq!(kept(), KEEP);
    }
}
