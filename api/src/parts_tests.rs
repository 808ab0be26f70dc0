#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use super::*;
use crate::v1::{AuthorizationPolicy, Service, Workload};

fn workload(i: usize, node: &str) -> Workload {
    Workload {
        uid: format!("shop/pod-{i}"),
        namespace: "shop".into(),
        name: format!("pod-{i}"),
        node: node.into(),
        ips: vec![format!("10.0.{}.{}", i / 250, i % 250)],
        labels: [("app".to_owned(), "x".repeat(i % 40))].into(),
        ..Workload::default()
    }
}

/// An update with every field set, `n` entries per list.
fn update(n: usize, full_state: bool) -> ConfigUpdate {
    ConfigUpdate {
        version: 7,
        full_state,
        local_workloads: (0..n).map(|i| workload(i, "node-1")).collect(),
        removed_local_workloads: (0..n).map(|i| format!("shop/gone-{i}")).collect(),
        remote_workloads: (n..3 * n).map(|i| workload(i, "node-2")).collect(),
        removed_remote_workloads: (0..n).map(|i| format!("shop/old-{i}")).collect(),
        services: (0..n)
            .map(|i| Service {
                name: format!("svc-{i}"),
                namespace: "shop".into(),
                ..Service::default()
            })
            .collect(),
        removed_services: vec!["shop/a".into()],
        trust: Some(TrustBundle {
            trust_domain: "cluster.local".into(),
            roots_pem: "-----BEGIN CERTIFICATE-----".into(),
        }),
        authorization_policies: (0..n)
            .map(|i| AuthorizationPolicy {
                name: format!("p-{i}"),
                ..AuthorizationPolicy::default()
            })
            .collect(),
        removed_authorization_policies: vec!["shop/old".into()],
        uninstalling: Some(false),
        meshed_namespaces: Some(MeshedNamespaces {
            names: vec!["shop".into()],
        }),
        more_follows: false,
    }
}

/// Decodes and assembles `parts`, checking that only the last is final.
fn assemble(parts: &[EncodedUpdate]) -> ConfigUpdate {
    let mut assembler = Assembler::default();
    let mut whole = None;
    for (i, part) in parts.iter().enumerate() {
        let decoded = ConfigUpdate::decode(part.bytes().clone()).unwrap();
        assert_eq!(decoded.more_follows, part.more_follows());
        assert_eq!(part.more_follows(), i + 1 < parts.len(), "part {i}");
        whole = assembler
            .push(decoded, part.bytes().len(), usize::MAX)
            .unwrap();
        assert_eq!(whole.is_some(), i + 1 == parts.len());
    }
    whole.unwrap()
}

#[test]
fn an_update_in_one_part_is_the_update_itself() {
    for full_state in [false, true] {
        let update = update(5, full_state);
        let parts = split(&update, usize::MAX);
        assert_eq!(parts.len(), 1);
        assert_eq!(
            ConfigUpdate::decode(parts[0].bytes().clone()).unwrap(),
            update
        );
    }
}

#[test]
fn small_parts_assemble_into_the_same_update_and_keep_their_size() {
    let update = update(300, true);
    let whole = update.encoded_len();
    let largest = update
        .remote_workloads
        .iter()
        .map(Message::encoded_len)
        .max()
        .unwrap();
    for max in [64, 1000, 4096, 20_000] {
        let parts = split(&update, max);
        assert!(
            parts.len() >= whole / max.max(largest),
            "{max}: {} parts",
            parts.len()
        );
        for part in &parts {
            // Only an entry larger than the limit makes a larger part: then
            // it is alone, with the part's header (version, full state,
            // more follows: 8 bytes here) and its own key and length.
            let bound = max.max(largest + 8 + 3);
            assert!(part.bytes().len() <= bound, "{max}: {}", part.bytes().len());
        }
        assert_eq!(assemble(&parts), update, "{max}");
    }
}

#[test]
fn an_entry_larger_than_a_part_goes_alone() {
    let mut big = workload(1, "node-2");
    big.labels.insert("big".into(), "v".repeat(10_000));
    let update = ConfigUpdate {
        version: 3,
        remote_workloads: vec![workload(0, "node-2"), big, workload(2, "node-2")],
        ..ConfigUpdate::default()
    };
    let parts = split(&update, 1000);
    assert_eq!(parts.len(), 3);
    assert!(parts[1].bytes().len() > 10_000);
    assert_eq!(assemble(&parts), update);
}

#[test]
fn pre_encoded_entries_read_as_messages() {
    let remote = workload(9, "node-3");
    let mut writer = PartWriter::new(2, true, usize::MAX);
    writer.encoded(List::RemoteWorkloads, &remote.encode_to_vec());
    writer.key(List::RemovedServices, "shop/x");
    let parts = writer.finish();
    let decoded = ConfigUpdate::decode(parts[0].bytes().clone()).unwrap();
    assert_eq!(decoded.remote_workloads, vec![remote]);
    assert_eq!(decoded.removed_services, vec!["shop/x".to_owned()]);
    assert!(decoded.full_state && decoded.version == 2);
}

#[test]
fn a_part_of_another_update_or_too_many_bytes_is_refused_and_the_assembler_starts_over() {
    let parts = split(&update(100, true), 2000);
    assert!(parts.len() > 3);
    let decode = |i: usize| ConfigUpdate::decode(parts[i].bytes().clone()).unwrap();

    let mut assembler = Assembler::default();
    assert_eq!(assembler.push(decode(0), 2000, usize::MAX), Ok(None));
    let mut other = decode(1);
    other.version = 8;
    assert!(matches!(
        assembler.push(other, 2000, usize::MAX),
        Err(Error::PartOutOfPlace {
            version: 7,
            part_version: 8,
            ..
        })
    ));
    assert!(!assembler.is_pending());
    let mut delta = decode(1);
    delta.full_state = false;
    assert_eq!(assembler.push(decode(0), 2000, usize::MAX), Ok(None));
    assert!(assembler.push(delta, 2000, usize::MAX).is_err());

    // Within the limit part by part, over it in all.
    assert_eq!(assembler.push(decode(0), 2000, 5000), Ok(None));
    assert_eq!(assembler.push(decode(1), 2000, 5000), Ok(None));
    assert!(matches!(
        assembler.push(decode(2), 2000, 5000),
        Err(Error::UpdateTooLarge {
            bytes: 6000,
            limit: 5000,
            ..
        })
    ));
    assert!(!assembler.is_pending());
    // After a refusal, a whole update goes through.
    let parts = split(&update(3, false), usize::MAX);
    let only = ConfigUpdate::decode(parts[0].bytes().clone()).unwrap();
    assert_eq!(assembler.push(only.clone(), 10, 5000), Ok(Some(only)));
}

#[test]
fn the_encoded_update_encodes_as_its_bytes() {
    let update = update(4, false);
    let encoded = EncodedUpdate::whole(&update);
    assert_eq!(encoded.encoded_len(), update.encoded_len());
    assert_eq!(encoded.encode_to_vec(), update.encode_to_vec());
}
