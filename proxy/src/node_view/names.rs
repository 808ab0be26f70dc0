//! Names that many workloads share (namespace, ServiceAccount, identity,
//! node, workload name), held once per process: at 50,000 pods a node's
//! view would otherwise store the same few thousand strings tens of
//! thousands of times.
//!
//! A name is kept while some workload holds it. The set itself is bounded:
//! once it has doubled since it was last trimmed, names that only it holds
//! are dropped, so it never holds more than twice the names in use (plus a
//! small floor), whatever a control plane sends over time.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

/// The set is not trimmed below this many names.
const FLOOR: usize = 4096;

struct Names {
    held: HashSet<Arc<str>>,
    /// Trim when `held` reaches this size.
    trim_at: usize,
}

static NAMES: LazyLock<Mutex<Names>> = LazyLock::new(|| {
    Mutex::new(Names {
        held: HashSet::new(),
        trim_at: FLOOR,
    })
});

/// `name`, shared with every other holder of the same name.
pub(crate) fn shared(name: &str) -> Arc<str> {
    let mut names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(held) = names.held.get(name) {
        return held.clone();
    }
    let new: Arc<str> = Arc::from(name);
    names.held.insert(new.clone());
    if names.held.len() >= names.trim_at {
        names.held.retain(|name| Arc::strong_count(name) > 1);
        names.trim_at = (names.held.len() * 2).max(FLOOR);
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_shared_while_held_and_the_set_stays_bounded() {
        let a = shared("names-test-shop");
        let b = shared("names-test-shop");
        assert!(Arc::ptr_eq(&a, &b));
        // Many names nobody keeps: the set is trimmed, not grown without end.
        for i in 0..FLOOR * 4 {
            drop(shared(&format!("names-test-passing-{i}")));
        }
        let names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(names.held.len() <= names.trim_at);
        assert!(names.trim_at <= FLOOR * 2 + 2, "{}", names.trim_at);
        drop(names);
        // What is still held was kept through the trims.
        assert!(Arc::ptr_eq(&a, &shared("names-test-shop")));
    }
}
