//! The watched manifests directory: every way a file changes (written in
//! place, replaced by an atomic rename, removed, added, broken) shows in
//! the published cluster, and only the files an event names are read again.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::write;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use weft_control_plane::cluster::ClusterState;
use weft_control_plane::manifests::{ManifestDir, watch_dir};

fn pod(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{nodeName: node-1, serviceAccountName: web, containers: []}}\nstatus: {{phase: Running, podIP: {ip}}}\n"
    )
}

fn pods(state: &ClusterState) -> Vec<(String, String)> {
    state
        .pods
        .iter()
        .map(|(key, pod)| {
            let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
            (key.clone(), ip.unwrap_or_default())
        })
        .collect()
}

/// Waits until the published cluster has exactly `expected` pods (key, IP).
async fn wait_for(states: &mut watch::Receiver<Arc<ClusterState>>, expected: &[(&str, &str)]) {
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(k, ip)| (k.to_string(), ip.to_string()))
        .collect();
    let seen = states.wait_for(|state| pods(state) == expected);
    let waited = tokio::time::timeout(Duration::from_secs(30), seen)
        .await
        .is_ok();
    assert!(
        waited,
        "expected {expected:?}, have {:?}",
        pods(&states.borrow())
    );
}

#[tokio::test]
async fn every_kind_of_file_change_reaches_the_published_cluster() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &pod("a", "10.0.0.1"));
    write(dir.path(), "b.yaml", &pod("b", "10.0.0.2"));
    let (mut states, problems) = watch_dir(dir.path(), Counter::default()).unwrap();
    wait_for(
        &mut states,
        &[("shop/a", "10.0.0.1"), ("shop/b", "10.0.0.2")],
    )
    .await;

    // Written in place.
    write(dir.path(), "a.yaml", &pod("a", "10.0.0.3"));
    wait_for(
        &mut states,
        &[("shop/a", "10.0.0.3"), ("shop/b", "10.0.0.2")],
    )
    .await;

    // Replaced atomically from a hidden temporary file (which is never read).
    write(dir.path(), ".b.yaml.tmp", &pod("b", "10.0.0.4"));
    std::fs::rename(dir.path().join(".b.yaml.tmp"), dir.path().join("b.yaml")).unwrap();
    wait_for(
        &mut states,
        &[("shop/a", "10.0.0.3"), ("shop/b", "10.0.0.4")],
    )
    .await;

    // Removed, and a new one added.
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    write(dir.path(), "c.yml", &pod("c", "10.0.0.5"));
    wait_for(
        &mut states,
        &[("shop/b", "10.0.0.4"), ("shop/c", "10.0.0.5")],
    )
    .await;

    // Broken: its last good objects stay, and the problem is reported.
    write(dir.path(), "c.yml", "kind: [");
    let mut problems = problems;
    let reported = problems.wait_for(|p| p.iter().any(|p| p.file.ends_with("c.yml")));
    assert!(
        tokio::time::timeout(Duration::from_secs(30), reported)
            .await
            .is_ok()
    );
    assert_eq!(
        pods(&states.borrow()),
        [
            ("shop/b".to_owned(), "10.0.0.4".to_owned()),
            ("shop/c".to_owned(), "10.0.0.5".to_owned())
        ]
    );
}

#[test]
fn reading_named_files_reads_only_those() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &pod("a", "10.0.0.1"));
    write(dir.path(), "b.yaml", &pod("b", "10.0.0.2"));
    let mut source = ManifestDir::new(dir.path());
    source.reload().unwrap();

    // Both files change on disk, but the event names only a.yaml.
    write(dir.path(), "a.yaml", &pod("a", "10.0.0.3"));
    write(dir.path(), "b.yaml", &pod("b", "10.0.0.4"));
    let named: BTreeSet<_> = [dir.path().join("a.yaml")].into();
    source.reload_files(&named).unwrap();
    let ips = pods(&source.state());
    assert_eq!(ips[0].1, "10.0.0.3");
    assert_eq!(ips[1].1, "10.0.0.2", "b.yaml was not named, so not read");

    // A gone file named by an event drops its objects.
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    source.reload_files(&named).unwrap();
    assert_eq!(pods(&source.state()).len(), 1);

    // A path outside the directory: everything is read again.
    let elsewhere: BTreeSet<_> = [Path::new("/elsewhere/x.yaml").to_owned()].into();
    source.reload_files(&elsewhere).unwrap();
    assert_eq!(
        pods(&source.state()),
        [("shop/b".into(), "10.0.0.4".into())]
    );
}

#[test]
fn an_object_in_two_files_is_the_later_files_until_that_file_lets_it_go() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &pod("first", "10.0.0.1"));
    write(dir.path(), "b.yaml", &pod("first", "10.0.0.2"));
    let mut source = ManifestDir::new(dir.path());
    source.reload().unwrap();
    assert_eq!(
        pods(&source.state()),
        [("shop/first".into(), "10.0.0.2".into())]
    );

    let b: BTreeSet<_> = [dir.path().join("b.yaml")].into();
    write(dir.path(), "b.yaml", &pod("second", "10.0.0.3"));
    source.reload_files(&b).unwrap();
    assert_eq!(source.problems(), vec![]);
    assert_eq!(
        pods(&source.state()),
        [
            ("shop/first".into(), "10.0.0.1".into()),
            ("shop/second".into(), "10.0.0.3".into())
        ],
        "a.yaml's pod is back"
    );
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    let a: BTreeSet<_> = [dir.path().join("a.yaml")].into();
    source.reload_files(&a).unwrap();
    assert_eq!(
        pods(&source.state()),
        [("shop/second".into(), "10.0.0.3".into())]
    );
}

#[test]
fn the_cluster_kept_file_by_file_is_the_cluster_read_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = ManifestDir::new(dir.path());
    source.reload().unwrap();
    // A deterministic walk over writes, rewrites with other pods, broken
    // files and deletions of five files sharing a few pod names.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut compared = 0;
    for step in 0..200 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let file = format!("f{}.yaml", seed % 5);
        let path = dir.path().join(&file);
        match (seed >> 8) % 4 {
            0 => {
                let _ = std::fs::remove_file(&path);
            }
            1 => write(dir.path(), &file, "kind: [not yaml"),
            _ => {
                let docs: Vec<String> = (0..(seed >> 16) % 4)
                    .map(|i| {
                        let name = format!("p{}", (seed >> (20 + i * 3)) % 7);
                        pod(&name, &format!("10.0.{}.{}", step % 250, i))
                    })
                    .collect();
                write(dir.path(), &file, &docs.join("---\n"));
            }
        }
        source.reload_files(&[path].into()).unwrap();
        let mut fresh = ManifestDir::new(dir.path());
        fresh.reload().unwrap();
        // A broken file keeps its last good objects in the kept source; a
        // fresh one never saw them. Compare only when no file is broken.
        if fresh.problems().is_empty() && source.problems().is_empty() {
            assert_eq!(source.state(), fresh.state(), "step {step}");
            compared += 1;
        }
    }
    assert!(compared > 30, "only {compared} steps without a broken file");
}

#[test]
fn a_large_file_edited_one_document_at_a_time_reads_as_it_would_afresh() {
    // The kept source parses again only the documents whose text changed;
    // whatever it reuses, it must agree with a source reading everything.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.yaml");
    let mut docs: Vec<String> = (0..12)
        .map(|i| pod(&format!("p{i}"), &format!("10.0.0.{i}")))
        .collect();
    let mut source = ManifestDir::new(dir.path());
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut compared = 0;
    let mut broken = None;
    for step in 0..300u64 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // A document broken by the step before is mended by this one.
        let (slot, case) = match broken.take() {
            Some(slot) => (slot, 7),
            None => ((seed % docs.len() as u64) as usize, (seed >> 8) % 8),
        };
        if case == 1 || case == 2 {
            broken = Some(slot);
        }
        docs[slot] = match case {
            // Another pod's name: the file defines one object twice.
            0 => pod(&format!("p{}", (seed >> 12) % 12), "10.0.9.9"),
            // A document the file is refused for.
            1 => "apiVersion: v1\nkind: Pod\nmetadata: {name: 5}\n".to_owned(),
            // Broken YAML.
            2 => "kind: [not yaml\n".to_owned(),
            // An empty document, or a kind weft does not use.
            3 => String::new(),
            4 => "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n".to_owned(),
            _ => pod(&format!("p{slot}"), &format!("10.0.{}.{slot}", step % 250)),
        };
        let text = format!("---\n{}", docs.join("---\n"));
        write(dir.path(), "many.yaml", &text);
        source.reload_files(&[path.clone()].into()).unwrap();
        let mut fresh = ManifestDir::new(dir.path());
        fresh.reload().unwrap();
        // The same problems, naming the same documents; a refused file
        // keeps its last good objects (and notes) where a fresh source has
        // none, so the rest is compared when the file is good.
        assert_eq!(source.problems(), fresh.problems(), "step {step}");
        if fresh.problems().is_empty() {
            assert_eq!(source.notes(), fresh.notes(), "step {step}");
            assert_eq!(source.state(), fresh.state(), "step {step}");
            compared += 1;
        }
    }
    assert!(
        compared > 50,
        "only {compared} steps without a refused file"
    );
}
