//! Who an address belongs to, kept in step with the config one changed
//! entry at a time (see [`super::routes::RouteTable::next`]).
//!
//! Two entries may claim one address: two pods (a stale pod and the one
//! that took its IP, or a bad config) or two Services. Every claim is
//! remembered, ordered by key, and what the address resolves to is settled
//! again whenever its claims change, so that a claim withdrawn leaves the
//! other one in place. The map is persistent: the table of the next config
//! version shares it, and a change costs the addresses it touches.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::node_view::HasKey;
use crate::packed_map::PackedMap;

/// Addresses and their claims.
#[derive(Debug)]
pub(super) struct AddressBook<T> {
    /// What each address resolves to, by family. Sorted and packed, not a
    /// hash trie: at 50,000 addresses a trie's sparse nodes cost several
    /// times the entries they hold, and a lookup here is once per
    /// connection. One pointer per address (the key is the entry's own),
    /// cheap to copy when a change copies its run, and an IPv4 address in
    /// four bytes: every remote pod has an entry here.
    v4: PackedMap<Ipv4Addr, Arc<T>>,
    v6: PackedMap<Ipv6Addr, Arc<T>>,
    /// The addresses several entries claim (rare): all their claims, by
    /// key. What they resolve to, if anything, is in `v4` / `v6`.
    contested: PackedMap<IpAddr, Arc<[Arc<T>]>>,
}

impl<T> Clone for AddressBook<T> {
    fn clone(&self) -> Self {
        AddressBook {
            v4: self.v4.clone(),
            v6: self.v6.clone(),
            contested: self.contested.clone(),
        }
    }
}

impl<T> Default for AddressBook<T> {
    fn default() -> Self {
        AddressBook {
            v4: PackedMap::new(),
            v6: PackedMap::new(),
            contested: PackedMap::new(),
        }
    }
}

/// Decides what an address with several claims resolves to (given the
/// address and the claims ordered by key); an address with one claim
/// resolves to it.
pub(super) type Settle<T> = fn(IpAddr, &[Arc<T>]) -> Option<Arc<T>>;

impl<T: HasKey> AddressBook<T> {
    /// What `ip` resolves to.
    pub(super) fn get(&self, ip: &IpAddr) -> Option<&Arc<T>> {
        match ip {
            IpAddr::V4(ip) => self.v4.get(ip),
            IpAddr::V6(ip) => self.v6.get(ip),
        }
    }

    /// Every address that resolves to something, with it.
    pub(super) fn iter(&self) -> impl Iterator<Item = (IpAddr, &Arc<T>)> {
        let v4 = self.v4.iter().map(|(ip, value)| (IpAddr::V4(*ip), value));
        let v6 = self.v6.iter().map(|(ip, value)| (IpAddr::V6(*ip), value));
        v4.chain(v6)
    }

    /// The claims on `ip` as the book holds them, by key.
    fn claims(&self, ip: &IpAddr) -> Vec<Arc<T>> {
        match self.contested.get(ip) {
            Some(by_key) => by_key.to_vec(),
            None => self.get(ip).cloned().into_iter().collect(),
        }
    }

    /// How many addresses are claimed more than once (for tests).
    #[cfg(test)]
    pub(super) fn contested(&self) -> usize {
        self.contested.len()
    }

    /// Changes to this book, made one entry at a time with
    /// [`BookChanges::change`] and applied at once by
    /// [`BookChanges::finish`] (each run of the book they touch is rebuilt
    /// once). `settle` decides the addresses left with several claims;
    /// `expected` is how many addresses the changes are likely to touch
    /// (a first full state knows: all of them), so that what holds them is
    /// made once, not grown.
    pub(super) fn changes(&self, settle: Settle<T>, expected: usize) -> BookChanges<'_, T> {
        BookChanges {
            book: self,
            v4: Vec::with_capacity(expected),
            v6: Vec::new(),
            settle,
        }
    }

    /// One change at once (see [`BookChanges::change`]).
    #[cfg(test)]
    pub(super) fn change(
        &mut self,
        before: Option<(&[IpAddr], &Arc<T>)>,
        after: Option<(&[IpAddr], &Arc<T>)>,
        settle: Settle<T>,
    ) {
        let mut changes = self.changes(settle, 0);
        changes.change(before, after);
        *self = changes.finish();
    }
}

/// Changes being made to an [`AddressBook`]: every claim made or withdrawn,
/// in order, by address family. Settled only when they are applied, so a
/// change costs one small record per address (a first full state makes
/// one for every address of the cluster), not a map of claims.
pub(super) struct BookChanges<'b, T> {
    book: &'b AddressBook<T>,
    v4: Vec<Claim<Ipv4Addr, T>>,
    v6: Vec<Claim<Ipv6Addr, T>>,
    settle: Settle<T>,
}

/// An entry's claim on an address, made (it replaces the entry's earlier
/// claim there, if any) or withdrawn.
struct Claim<A, T> {
    ip: A,
    made: bool,
    entry: Arc<T>,
}

impl<T: HasKey> BookChanges<'_, T> {
    /// Moves an entry's claims from the addresses of its `before` value
    /// to those of its `after` value (the same key: the entry as it was
    /// and as it is now; `None` where it is not).
    pub(super) fn change(
        &mut self,
        before: Option<(&[IpAddr], &Arc<T>)>,
        after: Option<(&[IpAddr], &Arc<T>)>,
    ) {
        let claimed = after.map_or(&[][..], |(ips, _)| ips);
        if let Some((ips, old)) = before {
            for ip in ips.iter().filter(|ip| !claimed.contains(ip)) {
                self.record(*ip, false, old);
            }
        }
        if let Some((ips, new)) = after {
            for ip in ips {
                self.record(*ip, true, new);
            }
        }
    }

    fn record(&mut self, ip: IpAddr, made: bool, entry: &Arc<T>) {
        let entry = entry.clone();
        match ip {
            IpAddr::V4(ip) => self.v4.push(Claim { ip, made, entry }),
            IpAddr::V6(ip) => self.v6.push(Claim { ip, made, entry }),
        }
    }

    /// The book with every change made.
    pub(super) fn finish(self) -> AddressBook<T> {
        let mut book = self.book.clone();
        let mut contested = Vec::new();
        let v4 = settled(self.book, self.settle, self.v4, &mut contested);
        book.v4.apply_sorted(v4);
        let v6 = settled(self.book, self.settle, self.v6, &mut contested);
        book.v6.apply_sorted(v6);
        contested.sort_by_key(|(ip, _)| *ip);
        book.contested.apply_sorted(contested);
        book
    }
}

/// An address's claims now that there are several, or `None` now that
/// there are not.
type ContestedChange<T> = (IpAddr, Option<Arc<[Arc<T>]>>);

/// What each address the `claims` touch resolves to now, in address order,
/// from `book`'s claims and these (in the order they were made). The
/// addresses left with several claims, and those that had several, go to
/// `contested`.
fn settled<'c, A, T>(
    book: &'c AddressBook<T>,
    settle: Settle<T>,
    mut claims: Vec<Claim<A, T>>,
    contested: &'c mut Vec<ContestedChange<T>>,
) -> impl Iterator<Item = (A, Option<Arc<T>>)> + 'c
where
    A: Copy + Ord + Into<IpAddr> + 'c,
    T: HasKey + 'c,
{
    // Stable: an entry's later claim on an address follows its earlier one.
    claims.sort_by_key(|claim| claim.ip);
    let mut claims = claims.into_iter().peekable();
    std::iter::from_fn(move || {
        let first = claims.next()?;
        let ip = first.ip;
        let address: IpAddr = ip.into();
        let mut by_key = book.claims(&address);
        for claim in std::iter::once(first).chain(std::iter::from_fn(|| {
            claims.next_if(|claim| claim.ip == ip)
        })) {
            let key = claim.entry.key();
            let at = by_key.binary_search_by(|held| held.key().cmp(key));
            match (at, claim.made) {
                (Ok(at), true) => by_key[at] = claim.entry,
                (Err(at), true) => by_key.insert(at, claim.entry),
                (Ok(at), false) => {
                    by_key.remove(at);
                }
                (Err(_), false) => {}
            }
        }
        let owner = match by_key.as_slice() {
            [] => None,
            [only] => Some(only.clone()),
            several => {
                let owner = settle(address, several);
                contested.push((address, Some(Arc::from(by_key))));
                return Some((ip, owner));
            }
        };
        if book.contested.contains_key(&address) {
            contested.push((address, None));
        }
        Some((ip, owner))
    })
}
