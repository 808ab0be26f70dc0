//! Values that many workloads share (names: namespace, identity, node,
//! workload name; and whole workload profiles, see `entries`), held once
//! per process: at 50,000 pods a node's view would otherwise store the
//! same few thousand values tens of thousands of times.
//!
//! A value is kept while some workload holds it. Each set is bounded: once
//! it has doubled since it was last trimmed, values that only it holds are
//! dropped, so it never holds more than twice the values in use (plus a
//! small floor), whatever a control plane sends over time.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

/// A set is not trimmed below this many values.
const FLOOR: usize = 4096;

/// One set of shared values.
pub(crate) struct Interner<T: ?Sized> {
    held: HashSet<Arc<T>>,
    /// Trim when `held` reaches this size.
    trim_at: usize,
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    /// An empty set.
    pub(crate) fn new() -> Self {
        Interner {
            held: HashSet::new(),
            trim_at: FLOOR,
        }
    }

    /// The held value equal to `value`, or a new one `make` makes of it.
    pub(crate) fn share(&mut self, value: &T, make: impl FnOnce(&T) -> Arc<T>) -> Arc<T> {
        if let Some(held) = self.held.get(value) {
            return held.clone();
        }
        self.hold(make(value))
    }

    /// Holds `new`, trimming the set if it is due.
    fn hold(&mut self, new: Arc<T>) -> Arc<T> {
        self.held.insert(new.clone());
        if self.held.len() >= self.trim_at {
            self.held.retain(|value| Arc::strong_count(value) > 1);
            self.trim_at = (self.held.len() * 2).max(FLOOR);
        }
        new
    }

    /// The held value equal to `value`, or `value` itself, held from now on.
    pub(crate) fn share_owned(&mut self, value: T) -> Arc<T>
    where
        T: Sized,
    {
        match self.held.get(&value) {
            Some(held) => held.clone(),
            None => self.hold(Arc::new(value)),
        }
    }

    #[cfg(test)]
    fn len_and_trim_at(&self) -> (usize, usize) {
        (self.held.len(), self.trim_at)
    }
}

/// A process-wide set, created on first use.
pub(crate) type Shared<T> = LazyLock<Mutex<Interner<T>>>;

/// `value` from the process-wide `set`, made by `make` if it holds none.
pub(crate) fn share<T: ?Sized + Hash + Eq>(
    set: &Shared<T>,
    value: &T,
    make: impl FnOnce(&T) -> Arc<T>,
) -> Arc<T> {
    set.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .share(value, make)
}

/// A new, empty process-wide set (for a `static`'s `LazyLock::new`).
pub(crate) fn new_set<T: ?Sized + Hash + Eq>() -> Mutex<Interner<T>> {
    Mutex::new(Interner::new())
}

/// `value` from the process-wide `set`, or `value` itself, added to it.
pub(crate) fn share_owned<T: Hash + Eq>(set: &Shared<T>, value: T) -> Arc<T> {
    set.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .share_owned(value)
}

static NAMES: Shared<str> = LazyLock::new(new_set);

/// `name`, shared with every other holder of the same name.
pub(crate) fn shared(name: &str) -> Arc<str> {
    share(&NAMES, name, |name| Arc::from(name))
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
        let (len, trim_at) = NAMES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len_and_trim_at();
        assert!(len <= trim_at);
        assert!(trim_at <= FLOOR * 2 + 2, "{trim_at}");
        // What is still held was kept through the trims.
        assert!(Arc::ptr_eq(&a, &shared("names-test-shop")));
    }
}
