//! The policy routing that delivers marked packets locally, per IP family:
//!
//! ```text
//! ip rule add priority <rule_priority> fwmark <capture_mark>/<capture_mark> table <route_table>
//! ip route replace local default dev lo table <route_table>
//! ```
//!
//! In a meshed pod, a reply to one of the proxy's transparent sockets (the
//! proxy reaching the application from the client's address) is addressed
//! to the client, not to the pod: the capture rules mark it, and without
//! this routing would send it out of the pod instead of delivering it to
//! the proxy.

use serde_json::Value;

use super::command::run;
use super::{CaptureConfig, CaptureError};

/// An IP family as `ip` spells it.
#[derive(Clone, Copy, Debug)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }
}

/// Adds the rule (unless it is there already) and the route. Rules of the
/// same mark and table that a crashed run left behind (at any other
/// priority, or twice) are deleted, in the same `ip -batch`, so the
/// namespace ends up with exactly one.
///
/// Never deletes and re-adds the rule: the batch is not atomic, and while
/// the rule is missing, the replies to the proxy's transparent sockets (its
/// connections into the pod) are routed out of the pod, to their client's
/// real address, whose stack resets them. A proxy that takes a pod over
/// installs its capture again under the running connections.
pub(super) fn install(config: &CaptureConfig, family: Family) -> Result<(), CaptureError> {
    let operation = format!(
        "installing the capture's policy routing ({})",
        family.flag()
    );
    let selector = selector(config);
    let wanted = u64::from(config.rule_priority);
    let priorities = rule_priorities(config, family, &operation)?;
    let kept = priorities.iter().position(|priority| *priority == wanted);
    let mut batch = Vec::new();
    if kept.is_none() {
        batch.push(format!("rule add priority {wanted} {selector}"));
    }
    for (index, priority) in priorities.iter().enumerate() {
        if Some(index) != kept {
            batch.push(format!("rule del priority {priority} {selector}"));
        }
    }
    batch.push(format!(
        "route replace local default dev lo table {}",
        config.route_table
    ));
    run_batch(family, &batch, &operation)
}

/// Deletes the rule and the route, if they are there.
pub(super) fn remove(config: &CaptureConfig, family: Family) -> Result<(), CaptureError> {
    let operation = format!("removing the capture's policy routing ({})", family.flag());
    let mut batch = delete_rules(config, family, &operation)?;
    let routes = list(
        family,
        &[
            "route", "show", "table", "all", "type", "local", "dev", "lo",
        ],
        &operation,
    )?;
    let table = config.route_table.to_string();
    let ours = routes
        .iter()
        .any(|route| route["table"] == table.as_str() && route["dst"] == "default");
    if ours {
        batch.push(format!("route del local default dev lo table {table}"));
    }
    if batch.is_empty() {
        return Ok(());
    }
    run_batch(family, &batch, &operation)
}

/// `fwmark M/M table T`: what identifies weft's rule.
fn selector(config: &CaptureConfig) -> String {
    let mark = config.capture_mark;
    format!("fwmark {mark:#x}/{mark:#x} table {}", config.route_table)
}

/// `ip -batch` lines deleting every rule with weft's selector, by priority.
fn delete_rules(
    config: &CaptureConfig,
    family: Family,
    operation: &str,
) -> Result<Vec<String>, CaptureError> {
    let selector = selector(config);
    Ok(rule_priorities(config, family, operation)?
        .into_iter()
        .map(|priority| format!("rule del priority {priority} {selector}"))
        .collect())
}

/// The priority of each rule with weft's selector (one per rule).
fn rule_priorities(
    config: &CaptureConfig,
    family: Family,
    operation: &str,
) -> Result<Vec<u64>, CaptureError> {
    let selector = selector(config);
    let mut args = vec!["rule", "list"];
    args.extend(selector.split(' '));
    let rules = list(family, &args, operation)?;
    rules
        .iter()
        .map(|rule| {
            rule["priority"]
                .as_u64()
                .ok_or_else(|| CaptureError::Output {
                    operation: operation.to_owned(),
                    command: format!("ip -j {} {}", family.flag(), args.join(" ")),
                    reason: format!("a rule without a priority: {rule}"),
                })
        })
        .collect()
}

/// Runs `ip -j -4|-6 <args>` and returns the JSON array it prints.
fn list(family: Family, args: &[&str], operation: &str) -> Result<Vec<Value>, CaptureError> {
    let mut full = vec!["-j", family.flag()];
    full.extend_from_slice(args);
    let out = run(operation, "ip", &full, None)?;
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    match serde_json::from_str::<Value>(&out) {
        Ok(Value::Array(items)) => Ok(items),
        Ok(other) => Err(CaptureError::Output {
            operation: operation.to_owned(),
            command: format!("ip {}", full.join(" ")),
            reason: format!("expected a JSON array, got {other}"),
        }),
        Err(e) => Err(CaptureError::Output {
            operation: operation.to_owned(),
            command: format!("ip {}", full.join(" ")),
            reason: format!("not JSON ({e}): {out:?}"),
        }),
    }
}

/// Runs the lines in one `ip -batch -`, which stops at the first failure.
fn run_batch(family: Family, batch: &[String], operation: &str) -> Result<(), CaptureError> {
    let script = batch.join("\n") + "\n";
    match run(
        operation,
        "ip",
        &[family.flag(), "-batch", "-"],
        Some(&script),
    ) {
        Ok(_) => Ok(()),
        // `ip` names the failed line by number only: show the lines.
        Err(CaptureError::Command {
            operation,
            command,
            status,
            stderr,
        }) => Err(CaptureError::Command {
            operation,
            command: format!("{command} <<< '{}'", batch.join("; ")),
            status,
            stderr,
        }),
        Err(other) => Err(other),
    }
}
