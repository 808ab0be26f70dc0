//! One writer among the control-plane replicas: a coordination.k8s.io Lease.
//! Every replica serves proxies; only the Lease holder writes status, so two
//! replicas never fight over an object's conditions.
//!
//! The holder renews every [`RENEW_EVERY`]; another replica takes over when
//! the Lease has not been renewed for [`LEASE_DURATION`]. Updates carry the
//! resourceVersion they read, so two replicas racing for an expired Lease
//! cannot both win: the API server refuses the second write.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// How long a Lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews (and others look).
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Competes for Lease `namespace/name` as `identity` for as long as the
/// returned receiver lives; it says whether this replica holds the Lease.
pub fn hold_lease(
    client: kube::Client,
    namespace: &str,
    name: &str,
    identity: String,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let leases = Api::<Lease>::namespaced(client, namespace);
    let name = name.to_owned();
    tokio::spawn(async move {
        loop {
            let holding = match try_hold(&leases, &name, &identity).await {
                Ok(holding) => holding,
                Err(error) => {
                    warn!(lease = %name, %error, "cannot read or renew the Lease; not writing status");
                    false
                }
            };
            let changed = tx.send_if_modified(|held| {
                let changed = *held != holding;
                *held = holding;
                changed
            });
            if changed {
                info!(lease = %name, %identity, holding, "Lease holder changed");
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    });
    rx
}

/// One round: takes or renews the Lease if it is free, expired or ours.
async fn try_hold(leases: &Api<Lease>, name: &str, identity: &str) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let duration = i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(15);
    let Some(mut lease) = leases.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.to_owned()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let ours = spec.holder_identity.as_deref() == Some(identity);
    let expired = spec.renew_time.as_ref().is_none_or(|renewed| {
        let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(duration));
        renewed.0 + SignedDuration::from_secs(held_for) < now
    });
    if !ours && !expired {
        debug!(holder = ?spec.holder_identity, "the Lease is held by another replica");
        return Ok(false);
    }
    if !ours {
        spec.holder_identity = Some(identity.to_owned());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(duration);
    // `replace` sends the resourceVersion we read: a concurrent writer makes
    // this fail with a conflict instead of both believing they hold it.
    match leases.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
