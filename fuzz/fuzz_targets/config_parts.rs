//! Arbitrary bytes as a run of config messages into the proxy's
//! `parts::Assembler`, and as one update that the control plane's
//! `parts::split` writes in parts of an arbitrary size. Nothing may panic;
//! the assembler never hands out more than its limit, or a part; after a
//! refusal it holds nothing; and any update, split at any size and put
//! back together, is the update it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_api::parts::{Assembler, split};
use weft_api::v1::ConfigUpdate;

fuzz_target!(|data: &[u8]| {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    // Messages: each prefixed by its length in one byte.
    let limit = 64 + usize::from(size) * 16;
    let mut assembler = Assembler::default();
    let mut input = rest;
    while let Some((&len, tail)) = input.split_first() {
        let len = usize::from(len).min(tail.len());
        let (message, tail) = tail.split_at(len);
        input = tail;
        let Ok(part) = ConfigUpdate::decode(message) else {
            continue;
        };
        match assembler.push(part, len, limit) {
            Ok(Some(update)) => assert!(!update.more_follows),
            Ok(None) => assert!(assembler.is_pending()),
            Err(_) => assert!(!assembler.is_pending()),
        }
    }

    let Ok(update) = ConfigUpdate::decode(rest) else {
        return;
    };
    let parts = split(&update, usize::from(size) * 8);
    let mut assembler = Assembler::default();
    let mut whole = None;
    for (i, part) in parts.iter().enumerate() {
        assert_eq!(part.more_follows(), i + 1 < parts.len());
        let decoded = ConfigUpdate::decode(part.bytes().clone()).expect("a part decodes");
        whole = assembler
            .push(decoded, part.bytes().len(), usize::MAX)
            .expect("parts of one update assemble");
    }
    let expected = ConfigUpdate {
        more_follows: false,
        ..update
    };
    assert_eq!(whole, Some(expected));
});
