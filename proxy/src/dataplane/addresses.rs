//! Who an address belongs to, kept in step with the config one changed
//! entry at a time (see [`super::routes::RouteTable::next`]).
//!
//! Two entries may claim one address: two pods (a stale pod and the one
//! that took its IP, or a bad config) or two Services. Every claim is
//! remembered, ordered by key, and what the address resolves to is settled
//! again whenever its claims change, so that a claim withdrawn leaves the
//! other one in place. The map is persistent: the table of the next config
//! version shares it, and a change costs the addresses it touches.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::packed_map::PackedMap;

/// An entry that claims addresses, and the key it has in the view (which
/// orders several claims on one address).
pub(super) trait Claimant {
    /// The entry's key in the view.
    fn key(&self) -> &Arc<str>;
}

/// Addresses and their claims.
#[derive(Debug)]
pub(super) struct AddressBook<T> {
    /// Sorted and packed, not a hash trie: at 50,000 addresses a trie's
    /// sparse nodes cost several times the entries they hold, and a lookup
    /// here is once per connection. Claims are held inline: the usual one
    /// is one pointer (the key is the entry's own), cheap to copy when a
    /// change copies its run; every remote pod has an entry here.
    entries: PackedMap<IpAddr, Claims<T>>,
}

/// The claims on one address.
#[derive(Debug)]
enum Claims<T> {
    /// The usual case: one entry claims it, and it resolves to that.
    One(Arc<T>),
    /// Several do (rare): all of them by key, and what it resolves to.
    Several(Box<Several<T>>),
}

#[derive(Debug)]
struct Several<T> {
    by_key: Vec<Arc<T>>,
    owner: Option<Arc<T>>,
}

// Derived `Clone` would ask `T: Clone`; only the `Arc`s are cloned.
impl<T> Clone for Claims<T> {
    fn clone(&self) -> Self {
        match self {
            Claims::One(value) => Claims::One(value.clone()),
            Claims::Several(several) => Claims::Several(Box::new(Several {
                by_key: several.by_key.clone(),
                owner: several.owner.clone(),
            })),
        }
    }
}

impl<T> Claims<T> {
    fn owner(&self) -> Option<&Arc<T>> {
        match self {
            Claims::One(value) => Some(value),
            Claims::Several(several) => several.owner.as_ref(),
        }
    }

    fn by_key(&self) -> Vec<Arc<T>> {
        match self {
            Claims::One(value) => vec![value.clone()],
            Claims::Several(several) => several.by_key.clone(),
        }
    }
}

impl<T> Clone for AddressBook<T> {
    fn clone(&self) -> Self {
        AddressBook {
            entries: self.entries.clone(),
        }
    }
}

impl<T> Default for AddressBook<T> {
    fn default() -> Self {
        AddressBook {
            entries: PackedMap::new(),
        }
    }
}

/// Decides what an address with several claims resolves to (given the
/// address and the claims ordered by key); an address with one claim
/// resolves to it.
pub(super) type Settle<T> = fn(IpAddr, &[Arc<T>]) -> Option<Arc<T>>;

impl<T: Claimant> AddressBook<T> {
    /// What `ip` resolves to.
    pub(super) fn get(&self, ip: &IpAddr) -> Option<&Arc<T>> {
        self.entries.get(ip).and_then(Claims::owner)
    }

    /// Every address that resolves to something, with it.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Arc<T>)> {
        self.entries
            .iter()
            .filter_map(|(ip, claims)| Some((ip, claims.owner()?)))
    }

    /// Changes to this book, made one entry at a time with
    /// [`BookChanges::change`] and applied at once by
    /// [`BookChanges::finish`] (each run of the book they touch is rebuilt
    /// once). `settle` decides the addresses left with several claims.
    pub(super) fn changes(&self, settle: Settle<T>) -> BookChanges<'_, T> {
        BookChanges {
            book: self,
            pending: BTreeMap::new(),
            settle,
        }
    }

    /// One change at once (see [`BookChanges::change`]).
    #[cfg(test)]
    pub(super) fn change(
        &mut self,
        key: &Arc<str>,
        before: &[IpAddr],
        after: Option<(&[IpAddr], &Arc<T>)>,
        settle: Settle<T>,
    ) {
        let mut changes = self.changes(settle);
        changes.change(key, before, after);
        *self = changes.finish();
    }
}

/// Changes being made to an [`AddressBook`]: the claims of the addresses
/// they touched so far, read before the book's.
pub(super) struct BookChanges<'b, T> {
    book: &'b AddressBook<T>,
    pending: BTreeMap<IpAddr, Option<Claims<T>>>,
    settle: Settle<T>,
}

impl<T: Claimant> BookChanges<'_, T> {
    /// Moves the claims of `key` from the addresses `before` to those of
    /// `after` (with the entry they now stand for, whose key is `key`), and
    /// settles every address this touched.
    pub(super) fn change(
        &mut self,
        key: &Arc<str>,
        before: &[IpAddr],
        after: Option<(&[IpAddr], &Arc<T>)>,
    ) {
        let claimed = after.map_or(&[][..], |(ips, _)| ips);
        let mut touched: Vec<IpAddr> = before.iter().chain(claimed).copied().collect();
        touched.sort_unstable();
        touched.dedup();
        for ip in touched {
            let held = match self.pending.get(&ip) {
                Some(pending) => pending.as_ref(),
                None => self.book.entries.get(&ip),
            };
            let mut by_key = held.map(Claims::by_key).unwrap_or_default();
            by_key.retain(|claimant| claimant.key() != key);
            if let Some((ips, value)) = after
                && ips.contains(&ip)
            {
                let at = by_key
                    .binary_search_by(|claimant| claimant.key().cmp(key))
                    .unwrap_or_else(|at| at);
                by_key.insert(at, value.clone());
            }
            let claims = match by_key.as_slice() {
                [] => None,
                [only] => Some(Claims::One(only.clone())),
                several => Some(Claims::Several(Box::new(Several {
                    owner: (self.settle)(ip, several),
                    by_key,
                }))),
            };
            self.pending.insert(ip, claims);
        }
    }

    /// The book with every change made.
    pub(super) fn finish(self) -> AddressBook<T> {
        let mut entries = self.book.entries.clone();
        entries.apply_sorted(self.pending);
        AddressBook { entries }
    }
}
