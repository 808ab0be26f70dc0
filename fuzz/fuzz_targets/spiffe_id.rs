//! Arbitrary strings into `Identity::parse`. Whatever parses must print back
//! to exactly the input (the parser is canonical: one spelling per identity),
//! re-parse to the same identity, and be buildable from its parts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_certs::Identity;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(id) = Identity::parse(input) else {
        return;
    };
    let printed = id.to_string();
    assert_eq!(printed, input, "parsed identity does not print back to its input");
    match Identity::parse(&printed) {
        Ok(again) => assert_eq!(again, id, "re-parsing the printed identity changed it"),
        Err(e) => panic!("printed identity {printed:?} does not parse: {e}"),
    }
    match Identity::new(id.trust_domain(), id.namespace(), id.service_account()) {
        Ok(built) => assert_eq!(built, id, "Identity::new on the parts differs"),
        Err(e) => panic!("Identity::new refuses the parts of {printed:?}: {e}"),
    }
});
