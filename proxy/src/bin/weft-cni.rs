//! `weft-cni`: weft's chained CNI plugin (see `weft_proxy::cni_plugin`).
//! The container runtime runs it with the CNI environment and the network
//! configuration on stdin; it prints the result (or a CNI error) on stdout.
//! Its diagnostics go to stderr, which runtimes log.
// Printing the result on stdout is the CNI protocol.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Read;

use weft_proxy::cni_plugin::{self, Answer, Invocation};

fn main() {
    let mut config = Vec::new();
    let read = std::io::stdin()
        .take(cni_plugin::MAX_CONFIG_BYTES)
        .read_to_end(&mut config);
    let invocation = Invocation {
        command: std::env::var("CNI_COMMAND").unwrap_or_default(),
        netns: std::env::var_os("CNI_NETNS")
            .filter(|netns| !netns.is_empty())
            .map(Into::into),
        args: std::env::var("CNI_ARGS").unwrap_or_default(),
        config,
    };
    let answer = match read {
        Ok(_) => cni_plugin::run(&invocation, weft_proxy::cni_api::send),
        Err(error) => Answer::Failed {
            code: cni_plugin::INVALID_CONFIG,
            msg: format!("reading the network config from stdin: {error}"),
        },
    };
    match answer {
        Answer::Done(printed) => {
            if !printed.is_empty() {
                println!("{printed}");
            }
        }
        Answer::Failed { code, msg } => {
            eprintln!("weft-cni: {msg}");
            let version = cni_plugin::parse_config(&invocation.config)
                .map(|config| config.cni_version)
                .unwrap_or_else(|_| "1.0.0".to_owned());
            println!("{}", Answer::error_json(code, &msg, &version));
            std::process::exit(1);
        }
    }
}
