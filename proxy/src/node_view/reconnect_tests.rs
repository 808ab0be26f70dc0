//! NodeView tests of one view following another across streams: a
//! reconnect's full state (versions start over, generations grow), and the
//! entries it lists unchanged, which stay the previous view's.

use std::sync::Arc;

use weft_api::v1;

use super::tests::*;
use super::{NodeView, Workload};

#[test]
fn generations_grow_across_streams_whose_versions_start_over() {
    // Stream one: versions 1 and 2. Stream two (a reconnect, or a restarted
    // control plane) starts at 1 again; the view is still the newest.
    let first = applied(&full(1));
    let second = NodeView::apply(Some(&first), &delta(2), NODE).unwrap().view;
    let third = NodeView::apply(Some(&second), &full(1), NODE).unwrap().view;
    assert_eq!(
        [first.generation(), second.generation(), third.generation()],
        [1, 2, 3]
    );
    assert_eq!(third.version(), 1, "the version is the control plane's");
}

/// A reconnect's full state lists every entry anew: those that did not
/// change stay the previous view's, so that the view and the route table
/// (which keeps entries the diff says did not change) hold one copy, not
/// an old and a new.
#[test]
fn a_reconnects_full_state_keeps_the_entries_that_did_not_change() {
    let mut before = full(1);
    before.authorization_policies.push(v1::AuthorizationPolicy {
        namespace: "default".into(),
        name: "deny-all".into(),
        action: v1::AuthorizationAction::Deny as i32,
        rules: vec![Default::default()],
    });
    let first = applied(&before);
    let mut again = before.clone();
    again
        .remote_workloads
        .push(workload("shop", "new", "new", "10.0.2.8", true));
    again.services[0].endpoints[0].ready = false;
    let second = NodeView::apply(Some(&first), &again, NODE).unwrap().view;
    let same = |a: &Arc<Workload>, b: &Arc<Workload>| Arc::ptr_eq(a, b);
    assert!(same(
        &first.remote_workloads()["shop/cart"],
        &second.remote_workloads()["shop/cart"]
    ));
    assert!(same(
        &first.local_workloads()["default/web"],
        &second.local_workloads()["default/web"]
    ));
    assert!(Arc::ptr_eq(
        &first.authorization_policies()["default/deny-all"],
        &second.authorization_policies()["default/deny-all"]
    ));
    assert!(
        !Arc::ptr_eq(
            &first.services()["default/web"],
            &second.services()["default/web"]
        ),
        "a changed entry is the new one"
    );
    assert!(!second.services()["default/web"].endpoints[0].ready);
    assert_eq!(second.remote_workloads().len(), 2);
}

/// Keeping an unchanged entry never keeps a quarantine that no longer
/// holds, nor drops one that does: a quarantine is part of the entry.
#[test]
fn an_entry_is_kept_only_with_its_quarantine_as_it_is() {
    let base = applied(&full(1));
    // Its update refused: the local pod keeps its entry, quarantined.
    let mut bad = workload("default", "web", "web", "10.0.1.5", true);
    bad.mtls_mode = 9;
    let mut update = delta(2);
    update.local_workloads = vec![bad];
    let (refused, _) = refused_entry(Some(&base), &update);
    let quarantined = &refused.local_workloads()["default/web"];
    assert!(quarantined.local().quarantine.is_some());
    // Listed as it was before the refusal: a new entry, free again.
    let mut update = delta(3);
    update.local_workloads = vec![workload("default", "web", "web", "10.0.1.5", true)];
    let freed = NodeView::apply(Some(&refused), &update, NODE).unwrap().view;
    let web = &freed.local_workloads()["default/web"];
    assert!(web.local().quarantine.is_none());
    assert!(!Arc::ptr_eq(web, quarantined));
    // Quarantined by the control plane: not the clean entry before.
    let mut update = delta(4);
    let mut claimed = workload("default", "web", "web", "10.0.1.5", true);
    claimed.quarantine = "another pod claims 10.0.1.5".into();
    update.local_workloads = vec![claimed];
    let held = NodeView::apply(Some(&freed), &update, NODE).unwrap().view;
    let web_held = &held.local_workloads()["default/web"];
    assert!(!Arc::ptr_eq(web_held, web));
    assert_eq!(
        web_held.local().quarantine.as_deref(),
        Some("another pod claims 10.0.1.5")
    );
}
