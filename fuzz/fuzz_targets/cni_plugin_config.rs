//! Arbitrary bytes as the network configuration the container runtime
//! hands weft's CNI plugin on stdin, for each command: nothing may panic;
//! an ADD either fails with a CNI error code or prints a JSON object (its
//! predecessors' result); a DEL never fails, whatever the config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_proxy::cni_api::CniReply;
use weft_proxy::cni_plugin::{Answer, Invocation, run};

fuzz_target!(|data: &[u8]| {
    for command in ["ADD", "DEL", "CHECK"] {
        let invocation = Invocation {
            command: command.into(),
            netns: Some("/var/run/netns/cni-fuzz".into()),
            args: "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1".into(),
            config: data.to_vec(),
        };
        let answer = run(&invocation, |_, request| {
            assert!(request.netns.is_absolute());
            Ok(CniReply { ok: true, error: None })
        });
        match (command, answer) {
            ("ADD", Answer::Done(printed)) => {
                let value: serde_json::Value =
                    serde_json::from_str(&printed).expect("the result is JSON");
                assert!(value.is_object());
            }
            ("DEL", Answer::Failed { msg, .. }) => panic!("a DEL failed: {msg}"),
            (_, Answer::Failed { code, msg }) => assert!(code > 0 && !msg.is_empty()),
            _ => {}
        }
    }
});
