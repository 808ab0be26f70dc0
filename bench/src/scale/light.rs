//! What a simulated node reads of a config update, read straight off the
//! protobuf wire: the version, whether it is a full state or a part, how
//! many workloads it carries, and for the few tracked pods their IP. Nothing
//! is allocated per workload: a thousand simulated nodes read 50,000
//! workloads each at join, on the same two cores as the control plane they
//! measure, and decoding every uid and IP into strings (as prost does) cost
//! them twice the control plane's CPU.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};

/// `ConfigUpdate` field numbers (api/proto/weft/v1/config.proto).
const VERSION: u32 = 1;
const FULL_STATE: u32 = 2;
const LOCAL_WORKLOADS: u32 = 3;
const REMOTE_WORKLOADS: u32 = 5;
const MORE_FOLLOWS: u32 = 14;
/// `Workload` field numbers.
const WORKLOAD_UID: u32 = 1;
const WORKLOAD_IPS: u32 = 7;

/// The pods the scenario changes, by uid, and their slot in a node's record.
#[derive(Debug, Default)]
pub struct TrackedPods {
    /// foldhash (hashbrown's default, already in the tree) instead of std's
    /// SipHash: every workload of every full state is looked up here.
    slots: HashMap<Box<[u8]>, usize, foldhash::fast::FixedState>,
}

impl TrackedPods {
    /// The pods `uids`, in slots numbered as they come.
    pub fn new(uids: &[String]) -> TrackedPods {
        TrackedPods {
            slots: uids
                .iter()
                .enumerate()
                .map(|(slot, uid)| (Box::from(uid.as_bytes()), slot))
                .collect(),
        }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// The slot of the pod `uid`.
    pub fn slot(&self, uid: &str) -> Option<usize> {
        self.slots.get(uid.as_bytes()).copied()
    }
}

/// A tracked pod an update carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carried {
    /// Its slot in [`TrackedPods`].
    pub slot: usize,
    /// Its first IPv4 address.
    pub ip: Option<Ipv4Addr>,
}

/// A config update (or the parts of one, put together) as far as the
/// scenario reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LightUpdate {
    /// `ConfigUpdate.version`.
    pub version: u64,
    /// `ConfigUpdate.full_state`.
    pub full_state: bool,
    /// `ConfigUpdate.more_follows`: this is a part, the next message
    /// continues the update.
    pub more_follows: bool,
    /// Local and remote workloads it carries.
    pub workloads: usize,
    /// The tracked pods among them.
    pub tracked: Vec<Carried>,
}

impl LightUpdate {
    /// Reads one encoded `weft.v1.ConfigUpdate`.
    pub fn read(message: &[u8], tracked: &TrackedPods) -> Result<LightUpdate> {
        let mut update = LightUpdate::default();
        for field in Fields(message) {
            match field? {
                (VERSION, Value::Varint(version)) => update.version = version,
                (FULL_STATE, Value::Varint(flag)) => update.full_state = flag != 0,
                (MORE_FOLLOWS, Value::Varint(flag)) => update.more_follows = flag != 0,
                (LOCAL_WORKLOADS | REMOTE_WORKLOADS, Value::Bytes(workload)) => {
                    update.workloads += 1;
                    if let Some(carried) = read_workload(workload, tracked)? {
                        update.tracked.push(carried);
                    }
                }
                (VERSION | FULL_STATE | MORE_FOLLOWS, _)
                | (LOCAL_WORKLOADS | REMOTE_WORKLOADS, _) => {
                    bail!("a ConfigUpdate field of the wrong wire type")
                }
                _ => {}
            }
        }
        Ok(update)
    }

    /// Adds `part`, the next part of this update.
    pub fn extend(&mut self, part: LightUpdate) -> Result<()> {
        if (self.version, self.full_state) != (part.version, part.full_state) {
            bail!(
                "a part of version {} continues version {}",
                part.version,
                self.version
            );
        }
        self.workloads += part.workloads;
        self.tracked.extend(part.tracked);
        self.more_follows = part.more_follows;
        Ok(())
    }
}

/// The tracked pod an encoded `Workload` is, if it is one. (Its IPs are
/// read only then, in a second pass: most workloads are not tracked.)
fn read_workload(workload: &[u8], tracked: &TrackedPods) -> Result<Option<Carried>> {
    let mut slot = None;
    for field in Fields(workload) {
        if let (WORKLOAD_UID, Value::Bytes(uid)) = field.context("reading a workload")? {
            slot = tracked.slots.get(uid).copied();
        }
    }
    let Some(slot) = slot else {
        return Ok(None);
    };
    let ip = Fields(workload).find_map(|field| match field {
        Ok((WORKLOAD_IPS, Value::Bytes(ip))) => std::str::from_utf8(ip).ok()?.parse().ok(),
        _ => None,
    });
    Ok(Some(Carried { slot, ip }))
}

/// A field's value on the wire.
enum Value<'a> {
    Varint(u64),
    /// Length-delimited: a string, bytes or a message.
    Bytes(&'a [u8]),
    /// A fixed 32- or 64-bit value, which the scenario never reads.
    Fixed,
}

/// The fields of an encoded message, in order, each as its number and value.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let field = self.field();
        if field.is_err() {
            self.0 = &[]; // stop after the first error
        }
        Some(field)
    }
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> Result<(u32, Value<'a>)> {
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).context("a field number over 2^32")?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint()?).context("a length over usize")?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            other => bail!("wire type {other} (groups are not used)"),
        };
        Ok((number, value))
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for (i, byte) in self.0.iter().take(10).enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        bail!("a varint that does not end")
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8]> {
        if len > self.0.len() {
            bail!("a field of {len} bytes, {} left", self.0.len());
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use weft_api::v1 as pb;

    fn workload(uid: &str, ips: &[&str]) -> pb::Workload {
        pb::Workload {
            uid: uid.into(),
            ips: ips.iter().map(|ip| (*ip).to_owned()).collect(),
            labels: [("app".to_owned(), "web".to_owned())].into(),
            identity: "spiffe://cluster.local/ns/a/sa/b".into(),
            ..pb::Workload::default()
        }
    }

    #[test]
    fn an_update_is_read_for_its_version_workloads_and_tracked_pods() {
        let update = pb::ConfigUpdate {
            version: 300,
            full_state: true,
            local_workloads: vec![workload("a/web-1", &["10.1.0.1"])],
            remote_workloads: vec![
                workload("a/db-1", &["fd00::2", "10.1.0.2"]),
                workload("a/db-2", &["10.1.0.3"]),
            ],
            services: vec![pb::Service {
                name: "web".into(),
                ..pb::Service::default()
            }],
            more_follows: true,
            ..pb::ConfigUpdate::default()
        };
        let tracked = TrackedPods::new(&["a/db-1".to_owned(), "b/gone".to_owned()]);
        let light = LightUpdate::read(&update.encode_to_vec(), &tracked).unwrap();
        assert_eq!(
            light,
            LightUpdate {
                version: 300,
                full_state: true,
                more_follows: true,
                workloads: 3,
                tracked: vec![Carried {
                    slot: 0,
                    ip: Some(Ipv4Addr::new(10, 1, 0, 2)),
                }],
            }
        );
    }

    #[test]
    fn parts_add_up_and_a_part_of_another_version_is_refused() {
        let tracked = TrackedPods::new(&["a/web-1".to_owned()]);
        let part = |version, workloads: Vec<pb::Workload>, more_follows| {
            let update = pb::ConfigUpdate {
                version,
                full_state: true,
                remote_workloads: workloads,
                more_follows,
                ..pb::ConfigUpdate::default()
            };
            LightUpdate::read(&update.encode_to_vec(), &tracked).unwrap()
        };
        let mut whole = part(4, vec![workload("a/db-1", &["10.0.0.1"])], true);
        whole
            .extend(part(4, vec![workload("a/web-1", &[])], false))
            .unwrap();
        assert_eq!(whole.workloads, 2);
        assert!(!whole.more_follows);
        assert_eq!(whole.tracked, [Carried { slot: 0, ip: None }]);
        assert!(whole.extend(part(5, Vec::new(), false)).is_err());
    }

    #[test]
    fn a_cut_or_garbled_message_is_an_error() {
        let update = pb::ConfigUpdate {
            version: 1,
            remote_workloads: vec![workload("a/db-1", &["10.0.0.1"])],
            ..pb::ConfigUpdate::default()
        }
        .encode_to_vec();
        let tracked = TrackedPods::default();
        for cut in 1..update.len() {
            // Every prefix either reads (it ends between fields) or fails.
            let _ = LightUpdate::read(&update[..cut], &tracked);
        }
        assert!(LightUpdate::read(&update[..update.len() - 1], &tracked).is_err());
        assert!(LightUpdate::read(&[0xff; 11], &tracked).is_err());
        assert!(LightUpdate::read(&[0x0b], &tracked).is_err()); // a group
        assert!(LightUpdate::read(&[0x08, 0x01], &tracked).is_ok());
    }
}
