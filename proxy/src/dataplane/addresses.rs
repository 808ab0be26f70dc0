//! Who an address belongs to, kept in step with the config one changed
//! entry at a time (see [`super::routes::RouteTable::next`]).
//!
//! Two entries may claim one address: two pods (a stale pod and the one
//! that took its IP, or a bad config) or two Services. Every claim is
//! remembered, ordered by key, and what the address resolves to is settled
//! again whenever its claims change, so that a claim withdrawn leaves the
//! other one in place. The map is persistent: the table of the next config
//! version shares it, and a change costs the addresses it touches.

use std::net::IpAddr;
use std::sync::Arc;

/// Addresses and their claims.
#[derive(Debug)]
pub(super) struct AddressBook<T> {
    /// Each address's claims behind an `Arc`, so that the persistent map
    /// copies pointers, not claims, when a change copies one of its nodes.
    entries: imbl::HashMap<IpAddr, Arc<Claims<T>>>,
}

/// The claims on one address, by key, and what it resolves to.
#[derive(Debug)]
struct Claims<T> {
    by_key: Vec<(String, Arc<T>)>,
    owner: Option<Arc<T>>,
}

// Derived `Clone` would ask `T: Clone`; only the `Arc`s are cloned.
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
            entries: imbl::HashMap::new(),
        }
    }
}

/// Decides what an address with several claims resolves to (given the
/// address and the claims ordered by key); an address with one claim
/// resolves to it.
pub(super) type Settle<T> = fn(IpAddr, &[(String, Arc<T>)]) -> Option<Arc<T>>;

impl<T> AddressBook<T> {
    /// What `ip` resolves to.
    pub(super) fn get(&self, ip: &IpAddr) -> Option<&Arc<T>> {
        self.entries
            .get(ip)
            .and_then(|claims| claims.owner.as_ref())
    }

    /// Every address that resolves to something, with it.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Arc<T>)> {
        self.entries
            .iter()
            .filter_map(|(ip, claims)| Some((ip, claims.owner.as_ref()?)))
    }

    /// Moves the claims of `key` from the addresses `before` to those of
    /// `after` (with the entry they now stand for), and settles every
    /// address this touched.
    pub(super) fn change(
        &mut self,
        key: &str,
        before: &[IpAddr],
        after: Option<(&[IpAddr], &Arc<T>)>,
        settle: Settle<T>,
    ) {
        let claimed = after.map_or(&[][..], |(ips, _)| ips);
        let mut touched: Vec<IpAddr> = before.iter().chain(claimed).copied().collect();
        touched.sort_unstable();
        touched.dedup();
        for ip in touched {
            let mut by_key = self
                .entries
                .get(&ip)
                .map(|claims| claims.by_key.clone())
                .unwrap_or_default();
            by_key.retain(|(claimant, _)| claimant != key);
            if let Some((ips, value)) = after
                && ips.contains(&ip)
            {
                let at = by_key
                    .binary_search_by(|(k, _)| k.as_str().cmp(key))
                    .unwrap_or_else(|at| at);
                by_key.insert(at, (key.to_owned(), value.clone()));
            }
            let owner = match by_key.as_slice() {
                [] => {
                    self.entries.remove(&ip);
                    continue;
                }
                [(_, only)] => Some(only.clone()),
                several => settle(ip, several),
            };
            self.entries.insert(ip, Arc::new(Claims { by_key, owner }));
        }
    }
}
