#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::collections::BTreeMap;

use super::*;
use crate::test_configs::Dice;

/// What `PackedMap::diff` should say, from two models.
fn model_diff(before: &BTreeMap<u32, u64>, after: &BTreeMap<u32, u64>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&u32> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter_map(|key| match (before.get(key), after.get(key)) {
            (Some(old), None) => Some(format!("-{key}={old}")),
            (None, Some(new)) => Some(format!("+{key}={new}")),
            (Some(old), Some(new)) if old != new => Some(format!("~{key}={old}>{new}")),
            _ => None,
        })
        .collect()
}

fn said(changes: &[Change<'_, u32, u64>]) -> Vec<String> {
    changes
        .iter()
        .map(|change| match change {
            Change::Removed(key, old) => format!("-{key}={old}"),
            Change::Added(key, new) => format!("+{key}={new}"),
            Change::Updated { key, old, new } => format!("~{key}={old}>{new}"),
        })
        .collect()
}

/// A long random walk of inserts and removals, each version kept: every
/// version reads like its model, and any two consecutive versions diff
/// like their models.
#[test]
fn every_version_reads_and_diffs_like_a_btree_map() {
    for seed in 1..=3u64 {
        let mut dice = Dice(seed * 104_729);
        let mut map: PackedMap<u32, u64> = PackedMap::new();
        let mut model: BTreeMap<u32, u64> = BTreeMap::new();
        let mut versions = Vec::new();
        for step in 0..1_200u64 {
            let before = (map.clone(), model.clone());
            // Bursts of one kind, so the map grows, shrinks and splits.
            let growing = (step / 300) % 2 == 0;
            for _ in 0..1 + dice.roll(8) {
                let key = u32::try_from(dice.roll(2_000)).unwrap();
                if dice.roll(4) < if growing { 3 } else { 1 } {
                    assert_eq!(map.insert(key, step), model.insert(key, step));
                } else {
                    assert_eq!(map.remove(&key), model.remove(&key));
                }
            }
            assert_eq!(map.len(), model.len());
            assert!(map.iter().eq(model.iter()));
            assert_eq!(
                said(&before.0.diff(&map).collect::<Vec<_>>()),
                model_diff(&before.1, &model),
                "seed {seed} step {step}"
            );
            if step % 100 == 0 {
                versions.push((map.clone(), model.clone()));
            }
        }
        // Later changes never reached the versions kept before them.
        for (kept, kept_model) in &versions {
            assert!(kept.iter().eq(kept_model.iter()));
            for key in [0, 7, 999, 1_999] {
                assert_eq!(kept.get(&key), kept_model.get(&key));
            }
        }
        let (first, first_model) = &versions[0];
        assert_eq!(
            said(&first.diff(&map).collect::<Vec<_>>()),
            model_diff(first_model, &model)
        );
    }
}

/// A full state arrives in key order: its runs end up at least half full,
/// so an entry costs about its own size. Removing most entries merges the
/// runs left small.
#[test]
fn entries_in_order_pack_into_runs_and_removals_merge_them() {
    let mut map: PackedMap<u32, u64> = (0..10_000).map(|n| (n, u64::from(n))).collect();
    assert_eq!(map.len(), 10_000);
    assert!(
        map.runs() <= 10_000 / (RUN_MAX / 2) + 1,
        "{} runs",
        map.runs()
    );
    for n in (0..10_000).filter(|n| n % 10 != 0) {
        map.remove(&n);
    }
    assert_eq!(map.len(), 1_000);
    assert!(map.runs() <= 1_000 / (RUN_MAX / 8), "{} runs", map.runs());
    assert_eq!(map.get(&5_000), Some(&5_000));
    assert_eq!(map.get(&5_001), None);
}

/// A change touches one run: the next version shares every other, and the
/// diff between them reads only that one.
#[test]
fn a_change_copies_one_run_and_the_diff_skips_the_shared_ones() {
    let map: PackedMap<u32, u64> = (0..10_000).map(|n| (n, 0)).collect();
    let mut next = map.clone();
    next.insert(5_000, 1);
    next.remove(&0);
    let changes = said(&map.diff(&next).collect::<Vec<_>>());
    assert_eq!(changes, ["-0=0", "~5000=0>1"]);
    let shared = map
        .runs
        .values()
        .filter(|run| next.runs.values().any(|other| *other == **run))
        .count();
    assert_eq!(shared, map.runs() - 2);
    // A key before every run goes into the first one.
    next.insert(0, 2);
    assert_eq!(next.keys().next(), Some(&0));
    assert_eq!(next[&0], 2);
}

/// A batch of changes (a full state, or a delta's) ends where the same
/// changes made one at a time, in order, end: the last one for a key
/// stands.
#[test]
fn a_batch_ends_where_its_changes_one_at_a_time_end() {
    let mut dice = Dice(7_919);
    let mut map: PackedMap<u32, u64> = PackedMap::new();
    let mut model: BTreeMap<u32, u64> = BTreeMap::new();
    for round in 0..200u64 {
        let size = if round == 0 {
            5_000
        } else {
            1 + dice.roll(300)
        };
        let batch: Vec<(u32, Option<u64>)> = (0..size)
            .map(|n| {
                let key = u32::try_from(dice.roll(6_000)).unwrap();
                (
                    key,
                    (dice.roll(3) != 0).then_some(round * 10_000 + n as u64),
                )
            })
            .collect();
        for (key, value) in &batch {
            match value {
                Some(value) => model.insert(*key, *value),
                None => model.remove(key),
            };
        }
        let before = map.clone();
        map.apply(batch);
        assert_eq!(map.len(), model.len(), "round {round}");
        assert!(map.iter().eq(model.iter()), "round {round}");
        assert!(before.diff(&map).count() <= size);
    }
    assert!(
        map.runs() <= model.len() / (RUN_MAX / 4) + 1,
        "{} runs",
        map.runs()
    );
}
