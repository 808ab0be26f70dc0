//! The mesh root CA on Kubernetes: kept in a Secret in the control plane's
//! namespace, created by whichever replica starts first and never
//! overwritten; and the roots published in a ConfigMap that node proxies
//! mount to authenticate the control plane before any config arrives.
//!
//! Two replicas starting at once need no lock: creating an object is atomic
//! in the API server, so exactly one create succeeds; the other gets a
//! conflict and loads the winner's CA.

use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tracing::info;
use weft_certs::MeshCa;

use crate::Error;

/// The Secret key holding the CA (certificate chain and PKCS#8 key, PEM).
pub const CA_SECRET_KEY: &str = "ca.pem";
/// The ConfigMap key holding the mesh roots (PEM), as proxies read them.
pub const ROOTS_CONFIG_MAP_KEY: &str = "root-cert.pem";
/// Field manager for the control plane's writes.
const FIELD_MANAGER: &str = "weft-control-plane";

fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_owned(),
        "weft-control-plane".to_owned(),
    )])
}

/// Loads the CA from Secret `namespace/name`, generating and storing a new
/// root if there is none.
pub async fn load_or_create_ca(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<MeshCa, Error> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let failed = |operation: &str| {
        let operation = format!("{operation} Secret {namespace}/{name}");
        move |source| Error::Kubernetes { operation, source }
    };
    if let Some(secret) = secrets.get_opt(name).await.map_err(failed("reading"))? {
        return ca_from_secret(&secret, namespace, name, trust_domain);
    }
    let generated = MeshCa::generate_root(trust_domain, SystemTime::now())?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            CA_SECRET_KEY.to_owned(),
            ByteString(generated.to_pem().into_bytes()),
        )])),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = %format!("{namespace}/{name}"), "stored the new mesh root CA");
            Ok(generated)
        }
        // Another replica stored one first: theirs is the CA.
        Err(kube::Error::Api(response)) if response.code == 409 => {
            info!(secret = %format!("{namespace}/{name}"), "another replica created the CA first; loading it");
            let secret = secrets.get(name).await.map_err(failed("reading"))?;
            ca_from_secret(&secret, namespace, name, trust_domain)
        }
        Err(source) => Err(failed("creating")(source)),
    }
}

fn ca_from_secret(
    secret: &Secret,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<MeshCa, Error> {
    let pem = secret
        .data
        .as_ref()
        .and_then(|data| data.get(CA_SECRET_KEY))
        .map(|bytes| String::from_utf8_lossy(&bytes.0).into_owned())
        .ok_or_else(|| Error::CaSecret {
            secret: format!("{namespace}/{name}"),
            reason: format!("it has no key {CA_SECRET_KEY}; it was not written by weft"),
        })?;
    MeshCa::from_pem(trust_domain, &pem, &pem).map_err(|source| Error::CaSecret {
        secret: format!("{namespace}/{name}"),
        reason: source.to_string(),
    })
}

/// Publishes the mesh roots in ConfigMap `namespace/name`. Every replica
/// publishes the same roots, so the apply is idempotent.
pub async fn publish_roots(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    roots_pem: &str,
) -> Result<(), Error> {
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            ROOTS_CONFIG_MAP_KEY.to_owned(),
            roots_pem.to_owned(),
        )])),
        ..ConfigMap::default()
    };
    // Server-side apply wants apiVersion and kind in the body.
    let mut body = serde_json::to_value(&config_map).map_err(|e| Error::CaSecret {
        secret: format!("{namespace}/{name}"),
        reason: format!("encoding the roots ConfigMap: {e}"),
    })?;
    body["apiVersion"] = "v1".into();
    body["kind"] = "ConfigMap".into();
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(|source| Error::Kubernetes {
            operation: format!("publishing the mesh roots in ConfigMap {namespace}/{name}"),
            source,
        })?;
    info!(config_map = %format!("{namespace}/{name}"), "published the mesh roots");
    Ok(())
}
