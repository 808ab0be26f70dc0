//! Arbitrary bytes as a DER CSR into `MeshCa::sign_csr`. It must never panic,
//! and whatever it signs must carry exactly the requested identity.
#![no_main]

use std::sync::OnceLock;
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use weft_certs::{Identity, MeshCa, identity_of};

const REQUESTED: &str = "spiffe://cluster.local/ns/fuzz/sa/target";

fn fixture() -> &'static (MeshCa, Identity) {
    static FIXTURE: OnceLock<(MeshCa, Identity)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let ca = MeshCa::generate_root("cluster.local", SystemTime::now())
            .expect("generating the fuzz CA");
        let requested = Identity::parse(REQUESTED).expect("the requested identity is valid");
        (ca, requested)
    })
}

fuzz_target!(|data: &[u8]| {
    let (ca, requested) = fixture();
    let Ok(chain) = ca.sign_csr(data, requested, SystemTime::now()) else {
        return;
    };
    let leaf = chain.first().expect("sign_csr returned an empty chain");
    match identity_of(leaf) {
        Ok(issued) => assert_eq!(&issued, requested, "signed a leaf for another identity"),
        Err(e) => panic!("signed leaf has no readable identity: {e}"),
    }
});
