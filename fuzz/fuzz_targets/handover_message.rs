//! Arbitrary bytes as a message on the hand-over socket (one datagram, as
//! either proxy of an upgrade reads it): nothing may panic, and what
//! parses is written back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_proxy::handover::wire::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(data) {
        assert_eq!(Message::decode(&message.encode()).ok(), Some(message));
    }
});
