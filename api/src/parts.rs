//! Updates in parts (`ConfigUpdate.more_follows`): how the control plane
//! writes one update as a run of small messages, and how the proxy puts
//! them back together.
//!
//! Why parts: gRPC sends and receives whole messages, and both sides keep a
//! buffer as large as the largest message a stream ever carried (tonic's
//! encoder and decoder do). A full state at 50,000 pods is about 8 MiB, so
//! a thousand streams would pin 8 GiB of buffers on the control plane alone.
//! In parts of a few tens of KiB, a stream's buffers stay that size.
//!
//! [`PartWriter`] also takes entries that are already encoded: an entry
//! that every node's full state carries (another node's pod, a Service) is
//! encoded once per change, not once per node. [`EncodedUpdate`] is what
//! the control plane's server sends; [`Assembler`] is the proxy's side.

use prost::Message;
use prost::bytes::{BufMut as _, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::Error;
use crate::v1::{ConfigUpdate, MeshedNamespaces, TrustBundle};

/// The fields of `ConfigUpdate` by number (see `weft.proto`).
mod field {
    pub const VERSION: u32 = 1;
    pub const FULL_STATE: u32 = 2;
    pub const LOCAL_WORKLOADS: u32 = 3;
    pub const REMOVED_LOCAL_WORKLOADS: u32 = 4;
    pub const REMOTE_WORKLOADS: u32 = 5;
    pub const REMOVED_REMOTE_WORKLOADS: u32 = 6;
    pub const SERVICES: u32 = 7;
    pub const REMOVED_SERVICES: u32 = 8;
    pub const TRUST: u32 = 9;
    pub const AUTHORIZATION_POLICIES: u32 = 10;
    pub const REMOVED_AUTHORIZATION_POLICIES: u32 = 11;
    pub const UNINSTALLING: u32 = 12;
    pub const MESHED_NAMESPACES: u32 = 13;
    pub const MORE_FOLLOWS: u32 = 14;
}

/// The most a part reserves up front.
const PART_PREALLOCATION: usize = 256 * 1024;

/// A list of `ConfigUpdate` that takes whole entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum List {
    /// `local_workloads`.
    LocalWorkloads,
    /// `removed_local_workloads`.
    RemovedLocalWorkloads,
    /// `remote_workloads`.
    RemoteWorkloads,
    /// `removed_remote_workloads`.
    RemovedRemoteWorkloads,
    /// `services`.
    Services,
    /// `removed_services`.
    RemovedServices,
    /// `authorization_policies`.
    AuthorizationPolicies,
    /// `removed_authorization_policies`.
    RemovedAuthorizationPolicies,
}

impl List {
    fn tag(self) -> u32 {
        match self {
            List::LocalWorkloads => field::LOCAL_WORKLOADS,
            List::RemovedLocalWorkloads => field::REMOVED_LOCAL_WORKLOADS,
            List::RemoteWorkloads => field::REMOTE_WORKLOADS,
            List::RemovedRemoteWorkloads => field::REMOVED_REMOTE_WORKLOADS,
            List::Services => field::SERVICES,
            List::RemovedServices => field::REMOVED_SERVICES,
            List::AuthorizationPolicies => field::AUTHORIZATION_POLICIES,
            List::RemovedAuthorizationPolicies => field::REMOVED_AUTHORIZATION_POLICIES,
        }
    }
}

/// One `ConfigUpdate` message, already encoded: what the control plane's
/// server ([`crate::encoded`]) sends. It is only ever encoded; decoding
/// one skips every field (a proxy decodes [`ConfigUpdate`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedUpdate {
    bytes: Bytes,
    more_follows: bool,
}

impl EncodedUpdate {
    /// `update`, whole, as one message.
    pub fn whole(update: &ConfigUpdate) -> EncodedUpdate {
        EncodedUpdate {
            bytes: update.encode_to_vec().into(),
            more_follows: update.more_follows,
        }
    }

    /// The message's bytes (a `ConfigUpdate`).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Whether the next message continues this update.
    pub fn more_follows(&self) -> bool {
        self.more_follows
    }
}

impl Message for EncodedUpdate {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.bytes);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    fn clear(&mut self) {
        *self = EncodedUpdate::default();
    }
}

/// Writes one update as parts of about `max_bytes` each: a part closes when
/// the next entry would take it over, so only a part holding a single entry
/// larger than that is larger. Entries keep their order. With
/// `usize::MAX`, the whole update is one message, as a proxy that does not
/// accept parts needs it.
#[derive(Debug)]
pub struct PartWriter {
    version: u64,
    full_state: bool,
    max_bytes: usize,
    /// The open part, its header written.
    current: BytesMut,
    /// Whether the open part holds anything beyond its header.
    has_entries: bool,
    /// Closed parts not yet taken.
    ready: std::collections::VecDeque<EncodedUpdate>,
}

impl PartWriter {
    /// A writer of the update at `version`.
    pub fn new(version: u64, full_state: bool, max_bytes: usize) -> PartWriter {
        let mut writer = PartWriter {
            version,
            full_state,
            max_bytes,
            current: BytesMut::new(),
            has_entries: false,
            ready: Default::default(),
        };
        writer.start_part();
        writer
    }

    /// Adds an entry to `list`.
    pub fn message(&mut self, list: List, entry: &impl Message) {
        let len = entry.encoded_len();
        self.make_room(list.tag(), len);
        encode_varint(len as u64, &mut self.current);
        entry.encode_raw(&mut self.current);
        self.has_entries = true;
    }

    /// Adds an entry to `list` that is already encoded (without a length
    /// delimiter).
    pub fn encoded(&mut self, list: List, entry: &[u8]) {
        self.make_room(list.tag(), entry.len());
        encode_varint(entry.len() as u64, &mut self.current);
        self.current.put_slice(entry);
        self.has_entries = true;
    }

    /// Adds a key to one of the `removed_*` lists.
    pub fn key(&mut self, list: List, key: &str) {
        self.encoded(list, key.as_bytes());
    }

    /// Sets `trust`.
    pub fn trust(&mut self, trust: &TrustBundle) {
        self.make_room(field::TRUST, trust.encoded_len());
        encode_varint(trust.encoded_len() as u64, &mut self.current);
        trust.encode_raw(&mut self.current);
        self.has_entries = true;
    }

    /// Sets `uninstalling`.
    pub fn uninstalling(&mut self, uninstalling: bool) {
        encode_key(field::UNINSTALLING, WireType::Varint, &mut self.current);
        encode_varint(u64::from(uninstalling), &mut self.current);
        self.has_entries = true;
    }

    /// Sets `meshed_namespaces`.
    pub fn meshed_namespaces(&mut self, names: &MeshedNamespaces) {
        self.make_room(field::MESHED_NAMESPACES, names.encoded_len());
        encode_varint(names.encoded_len() as u64, &mut self.current);
        names.encode_raw(&mut self.current);
        self.has_entries = true;
    }

    /// A closed part, if one is waiting: the caller can send it before
    /// writing on.
    pub fn ready_part(&mut self) -> Option<EncodedUpdate> {
        self.ready.pop_front()
    }

    /// Whether a closed part is waiting.
    pub fn has_ready_part(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The closed parts not yet taken, then the last part.
    pub fn finish(mut self) -> Vec<EncodedUpdate> {
        let last = EncodedUpdate {
            bytes: std::mem::take(&mut self.current).freeze(),
            more_follows: false,
        };
        self.ready.push_back(last);
        self.ready.into()
    }

    /// Whether the update has no entry yet: a delta that would be sent
    /// empty is not sent.
    pub fn is_empty(&self) -> bool {
        !self.has_entries && self.ready.is_empty()
    }

    fn start_part(&mut self) {
        encode_key(field::VERSION, WireType::Varint, &mut self.current);
        encode_varint(self.version, &mut self.current);
        if self.full_state {
            encode_key(field::FULL_STATE, WireType::Varint, &mut self.current);
            encode_varint(1, &mut self.current);
        }
    }

    /// Closes the open part if an entry of `len` bytes would take it over
    /// the limit, then writes the entry's key.
    fn make_room(&mut self, tag: u32, len: usize) {
        let entry = key_len(tag) + encoded_len_varint(len as u64);
        let over = self
            .current
            .len()
            .saturating_add(entry)
            .saturating_add(len)
            .saturating_add(2) // more_follows, which closing adds
            > self.max_bytes;
        if self.has_entries && over {
            encode_key(field::MORE_FOLLOWS, WireType::Varint, &mut self.current);
            encode_varint(1, &mut self.current);
            let part = std::mem::take(&mut self.current).freeze();
            self.ready.push_back(EncodedUpdate {
                bytes: part,
                more_follows: true,
            });
            self.has_entries = false;
            self.start_part();
        }
        // A part that outgrows its buffer gets room for a whole part at
        // once rather than doubling its way there (a full state is mostly
        // copying); a small delta keeps a small buffer.
        let needed = entry.saturating_add(len);
        if self.current.capacity() - self.current.len() < needed {
            let part = self.max_bytes.min(PART_PREALLOCATION);
            self.current
                .reserve(needed.max(part.saturating_sub(self.current.len())));
        }
        encode_key(tag, WireType::LengthDelimited, &mut self.current);
    }
}

/// Writes `update` in parts of about `max_bytes` (see [`PartWriter`]).
pub fn split(update: &ConfigUpdate, max_bytes: usize) -> Vec<EncodedUpdate> {
    let ConfigUpdate {
        version,
        full_state,
        local_workloads,
        removed_local_workloads,
        remote_workloads,
        removed_remote_workloads,
        services,
        removed_services,
        trust,
        authorization_policies,
        removed_authorization_policies,
        uninstalling,
        meshed_namespaces,
        more_follows: _,
    } = update;
    let mut writer = PartWriter::new(*version, *full_state, max_bytes);
    if let Some(trust) = trust {
        writer.trust(trust);
    }
    if let Some(uninstalling) = uninstalling {
        writer.uninstalling(*uninstalling);
    }
    if let Some(names) = meshed_namespaces {
        writer.meshed_namespaces(names);
    }
    for (list, entries) in [
        (List::LocalWorkloads, local_workloads),
        (List::RemoteWorkloads, remote_workloads),
    ] {
        for entry in entries {
            writer.message(list, entry);
        }
    }
    for entry in services {
        writer.message(List::Services, entry);
    }
    for entry in authorization_policies {
        writer.message(List::AuthorizationPolicies, entry);
    }
    for (list, keys) in [
        (List::RemovedLocalWorkloads, removed_local_workloads),
        (List::RemovedRemoteWorkloads, removed_remote_workloads),
        (List::RemovedServices, removed_services),
        (
            List::RemovedAuthorizationPolicies,
            removed_authorization_policies,
        ),
    ] {
        for key in keys {
            writer.key(list, key);
        }
    }
    writer.finish()
}

/// Puts an update sent in parts back together, as the proxy receives them.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<ConfigUpdate>,
    pending_bytes: usize,
}

impl Assembler {
    /// Takes the next message of the stream (`bytes`: its size on the
    /// wire); the whole update once its last part is in. An update larger
    /// than `max_bytes` in all, or a part that does not continue the update
    /// before it, is an error, after which the assembler starts over.
    pub fn push(
        &mut self,
        part: ConfigUpdate,
        bytes: usize,
        max_bytes: usize,
    ) -> Result<Option<ConfigUpdate>, Error> {
        let more = part.more_follows;
        let (assembled, total) = match self.pending.take() {
            None => (part, bytes),
            Some(mut pending) => {
                if (part.version, part.full_state) != (pending.version, pending.full_state) {
                    self.pending_bytes = 0;
                    return Err(Error::PartOutOfPlace {
                        version: pending.version,
                        full_state: pending.full_state,
                        part_version: part.version,
                        part_full_state: part.full_state,
                    });
                }
                append(&mut pending, part);
                (pending, self.pending_bytes.saturating_add(bytes))
            }
        };
        if total > max_bytes {
            self.pending_bytes = 0;
            return Err(Error::UpdateTooLarge {
                version: assembled.version,
                bytes: total,
                limit: max_bytes,
            });
        }
        if more {
            self.pending = Some(assembled);
            self.pending_bytes = total;
            return Ok(None);
        }
        self.pending_bytes = 0;
        Ok(Some(ConfigUpdate {
            more_follows: false,
            ..assembled
        }))
    }

    /// Whether part of an update is waiting for the rest.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }
}

/// Appends `part`'s lists to `update`'s and takes the single fields it has.
fn append(update: &mut ConfigUpdate, part: ConfigUpdate) {
    let ConfigUpdate {
        version: _,
        full_state: _,
        local_workloads,
        removed_local_workloads,
        remote_workloads,
        removed_remote_workloads,
        services,
        removed_services,
        trust,
        authorization_policies,
        removed_authorization_policies,
        uninstalling,
        meshed_namespaces,
        more_follows: _,
    } = part;
    update.local_workloads.extend(local_workloads);
    update
        .removed_local_workloads
        .extend(removed_local_workloads);
    update.remote_workloads.extend(remote_workloads);
    update
        .removed_remote_workloads
        .extend(removed_remote_workloads);
    update.services.extend(services);
    update.removed_services.extend(removed_services);
    update.authorization_policies.extend(authorization_policies);
    update
        .removed_authorization_policies
        .extend(removed_authorization_policies);
    if trust.is_some() {
        update.trust = trust;
    }
    if uninstalling.is_some() {
        update.uninstalling = uninstalling;
    }
    if meshed_namespaces.is_some() {
        update.meshed_namespaces = meshed_namespaces;
    }
}

#[cfg(test)]
#[path = "parts_tests.rs"]
mod tests;
