//! End to end on the testbed: the control plane's dashboard shows what the
//! mesh does. The proxies report their traffic up their config streams; the
//! dashboard's JSON (what its pages draw) must show the test's own
//! connections, a refused one under the policy that refused it, every node
//! with its proxy and certificates, and answer the explain form as the CLI
//! does.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::time::Duration;

use serde_json::Value;
use weft_testbed::{ALLOW_WEB_TO_DB, Testbed, WeftMesh, wait_until};

fn start() -> (Testbed, WeftMesh, weft_testbed::EchoServer) {
    let testbed = weft_testbed::shop_testbed().unwrap();
    let (mesh, server) = weft_testbed::start_mesh_with_db_echo(&testbed).unwrap();
    (testbed, mesh, server)
}

/// web-1 talks to db three times, old-1 once in plaintext, then a policy
/// lets only web reach db and batch-1 is refused.
fn traffic_and_a_refusal(testbed: &Testbed, mesh: &WeftMesh) {
    let db = weft_testbed::shop_db(testbed).unwrap();
    for _ in 0..3 {
        assert!(weft_testbed::echoes(testbed, "web-1", db));
    }
    // Plaintext from outside the mesh, accepted (PERMISSIVE).
    assert!(weft_testbed::echoes(testbed, "old-1", db));
    mesh.write_manifest("policy.yaml", ALLOW_WEB_TO_DB).unwrap();
    weft_testbed::wait_for_reach(testbed, "batch-1", db, false);
    assert!(!weft_testbed::echoes(testbed, "batch-1", db));
}

fn api(mesh: &WeftMesh, testbed: &Testbed, path: &str) -> Value {
    let body = mesh.control_plane_page(testbed, path).unwrap();
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// The edge from a source whose name contains `from` to one whose name
/// contains `to`, if the dashboard shows one.
fn edge(traffic: &Value, from: &str, to: &str) -> Option<Value> {
    traffic["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["source"].as_str().unwrap().contains(from)
                && e["destination"].as_str().unwrap().contains(to)
        })
        .cloned()
}

#[test]
fn the_dashboard_shows_the_mesh_its_traffic_and_a_refusal_under_its_policy() {
    let (testbed, mesh, _server) = start();
    traffic_and_a_refusal(&testbed, &mesh);

    // The reports come every second; wait until the window holds them.
    let mut traffic = Value::Null;
    wait_until(Duration::from_secs(30), || {
        traffic = api(&mesh, &testbed, "/api/traffic");
        let web = edge(&traffic, "web", "db");
        let batch = edge(&traffic, "batch", "db");
        Ok(web.is_some_and(|e| e["opened"].as_u64() >= Some(3))
            && batch.is_some_and(|e| e["denied"]["shop/db-from-web"].as_u64() >= Some(1)))
    })
    .unwrap_or_else(|e| panic!("{e}: {traffic:#}"));
    let web = edge(&traffic, "web", "db").unwrap();
    assert_eq!(web["security"], "mutual_tls", "{web}");
    assert_eq!(
        web["reported_by"], "destination",
        "counted once, from db's node: {web}"
    );
    assert!(web["bytes_received"].as_u64().unwrap() > 0, "{web}");
    assert_eq!(
        web["source_principal"],
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    let plaintext = traffic["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["security"] == "none" && e["destination"].as_str().unwrap().contains("db"));
    assert!(
        plaintext.is_some(),
        "plaintext from old-1 is shown as plaintext: {traffic:#}"
    );

    // Every node with its proxy, on its latest config, with certificates.
    let nodes = api(&mesh, &testbed, "/api/nodes");
    for node in nodes.as_array().unwrap() {
        assert_eq!(node["connected"], true, "{node}");
        assert_eq!(node["up_to_date"], true, "{node}");
    }
    let node_2 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-2")
        .unwrap();
    assert!(
        node_2["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["identity"] == "spiffe://cluster.local/ns/shop/sa/db"
                && c["expires_in_seconds"].as_i64().unwrap() > 0),
        "{node_2}"
    );

    // The workloads: db is meshed and selected by the policy, its
    // certificate known.
    let workloads = api(&mesh, &testbed, "/api/workloads?namespace=shop&q=db");
    let db_pod = &workloads["workloads"][0];
    assert_eq!(db_pod["meshed"], true, "{db_pod}");
    assert_eq!(db_pod["policies"][0], "shop/db-from-web", "{db_pod}");
    assert!(db_pod["certificate"]["not_after"].is_i64(), "{db_pod}");

    // The explain form answers as the CLI.
    for (from, allowed) in [("shop/web", true), ("shop/batch", false)] {
        let answer = api(
            &mesh,
            &testbed,
            &format!("/api/explain?from={from}&to=shop/db-1:5432"),
        );
        let (report, cli_allowed) =
            weft_testbed::explain(&mesh, &["--from", from, "--to", "shop/db-1:5432"]).unwrap();
        assert_eq!(answer["allowed"], allowed, "{answer}");
        assert_eq!(cli_allowed, allowed);
        assert_eq!(answer["report"], report.as_str());
    }

    let overview = api(&mesh, &testbed, "/api/overview");
    assert!(overview["traffic"]["denied"].as_u64().unwrap() >= 1);
    assert_eq!(overview["policies"]["not_accepted"], 0);
}

/// Metrics the shipped dashboards read that weft does not export: the
/// kubelet's cAdvisor metrics of the containers (every cluster has them).
const KUBELET_METRICS: &[&str] = &[
    "container_cpu_usage_seconds_total",
    "container_memory_working_set_bytes",
];

/// PromQL's functions, aggregations and keywords: every other name in an
/// expression (outside braces and label lists) is a metric.
const PROMQL_WORDS: &[&str] = &[
    "sum", "max", "min", "count", "topk", "rate", "increase", "time", "vector", "absent", "by",
    "on", "unless", "and", "or", "offset", "without", "ignoring",
];

/// The metric names in a PromQL expression.
fn metrics_in(expr: &str) -> Vec<String> {
    // Drop label matchers, label lists after by/on, string literals and
    // range selectors: what is left are metrics, functions and keywords.
    let mut text = String::new();
    let mut depth = 0;
    for c in expr.chars() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            _ if depth == 0 => text.push(c),
            _ => {}
        }
    }
    for word in ["by", "on", "without", "ignoring"] {
        while let Some(at) = find_word(&text, word) {
            let rest = &text[at + word.len()..];
            let Some(open) = rest.find('(') else { break };
            let Some(close) = rest.find(')') else { break };
            text = format!("{} {}", &text[..at], &rest[close + 1..]);
            let _ = open;
        }
    }
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| !w.is_empty() && !w.starts_with(|c: char| c.is_ascii_digit()))
        .filter(|w| !PROMQL_WORDS.contains(w))
        .map(str::to_owned)
        .collect()
}

/// Where `word` stands as a word in `text`.
fn find_word(text: &str, word: &str) -> Option<usize> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).map(|(at, _)| at).find(|&at| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

/// The series names a scrape declares (`# TYPE` lines): a counter's
/// samples end in `_total`.
fn exported(scrape: &str) -> Vec<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .flat_map(|l| {
            let mut words = l.split(' ');
            let (name, kind) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_owned()],
            }
        })
        .collect()
}

/// The metric names in the crates' sources: every string literal that
/// reads as one (`"weft_…"`, `"istio_…"`), each as itself and as a
/// counter's `_total`. A family with no series yet is left out of a scrape,
/// and some only get one on a rare event (an outlier ejection, a bound
/// reached); a renamed metric leaves no literal behind.
fn registered_in_source() -> Vec<String> {
    let root = weft_testbed::kube_cluster::deploy_dir().join("..");
    let mut names = Vec::new();
    let mut dirs = vec![root.join("proxy/src"), root.join("control-plane/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for literal in text.split('"').skip(1).step_by(2) {
                let is_name = (literal.starts_with("weft_") || literal.starts_with("istio_"))
                    && literal
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if is_name {
                    names.push(literal.to_owned());
                    names.push(format!("{literal}_total"));
                }
            }
        }
    }
    names
}

#[test]
fn the_shipped_dashboards_and_alerts_read_only_metrics_weft_exports() {
    let (testbed, mesh, _server) = start();
    // Traffic, a refusal and a reported certificate, so that most families
    // have series (the rest are found where they are registered).
    let db = weft_testbed::shop_db(&testbed).unwrap();
    assert!(weft_testbed::echoes(&testbed, "web-1", db));
    mesh.write_manifest("policy.yaml", ALLOW_WEB_TO_DB).unwrap();
    weft_testbed::wait_for_reach(&testbed, "batch-1", db, false);
    let scrape = || {
        let mut names = exported(&mesh.control_plane_page(&testbed, "/metrics").unwrap());
        for node in ["node-1", "node-2"] {
            names.extend(exported(&mesh.proxy_metrics(&testbed, node).unwrap()));
        }
        names
    };
    let mut names = Vec::new();
    wait_until(Duration::from_secs(30), || {
        names = scrape();
        Ok(names
            .iter()
            .any(|n| n == "weft_control_plane_certificate_expiry_soonest_timestamp_seconds"))
    })
    .unwrap();
    for name in [
        "weft_authorization_decisions_total",
        "weft_tcp_failures_total",
        "istio_tcp_connections_opened_total",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} is scraped");
    }
    let registered = registered_in_source();
    // The source scan finds what the scrape found.
    for name in &names {
        assert!(
            registered.contains(name),
            "{name} is scraped but not found registered"
        );
    }
    names.extend(registered);
    names.extend(KUBELET_METRICS.iter().map(|m| (*m).to_owned()));

    let files = weft_testbed::kube_cluster::deploy_dir().join("helm/weft/files");
    let mut expressions = Vec::new();
    for entry in std::fs::read_dir(files.join("grafana")).unwrap() {
        let path = entry.unwrap().path();
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap().to_owned();
                expressions.push((format!("{}: {}", path.display(), panel["title"]), expr));
            }
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            if let Some(query) = variable["query"]["query"].as_str() {
                // label_values(<metric selector>, <label>)
                let inner = query
                    .trim_start_matches("label_values(")
                    .rsplit_once(',')
                    .map_or(query, |(selector, _)| selector);
                expressions.push((format!("{}: variable", path.display()), inner.to_owned()));
            }
        }
    }
    let alerts: Value = weft_testbed::kube_cluster::yaml_objects(
        &std::fs::read_to_string(files.join("prometheus/weft-alerts.yaml")).unwrap(),
    )
    .unwrap()
    .remove(0);
    for rule in alerts["groups"][0]["rules"].as_array().unwrap() {
        expressions.push((
            format!("alert {}", rule["alert"]),
            rule["expr"].as_str().unwrap().to_owned(),
        ));
    }
    assert!(expressions.len() > 30, "{expressions:?}");
    let mut missing = Vec::new();
    for (place, expr) in &expressions {
        for metric in metrics_in(expr) {
            if !names.contains(&metric) {
                missing.push(format!("{metric} ({place})"));
            }
        }
    }
    assert!(missing.is_empty(), "not exported: {missing:#?}");
}

/// Prometheus itself reads the shipped alert rules (`promtool check
/// rules`), and its rule unit tests (`tests/alerts/weft-alerts-test.yaml`)
/// show each alert firing on the series that should raise it, naming the
/// culprit, and quiet otherwise.
#[test]
fn prometheus_accepts_the_alert_rules_and_they_fire_when_they_should() {
    let root = weft_testbed::repo_root();
    let found = std::process::Command::new("bash")
        .arg(root.join("scripts/promtool.sh"))
        .arg("path")
        .output()
        .unwrap();
    assert!(found.status.success(), "scripts/promtool.sh path failed");
    let promtool = String::from_utf8(found.stdout).unwrap().trim().to_owned();
    for (args, dir) in [
        (
            ["check", "rules", "weft-alerts.yaml"],
            root.join("deploy/helm/weft/files/prometheus"),
        ),
        (
            ["test", "rules", "weft-alerts-test.yaml"],
            root.join("tests/alerts"),
        ),
    ] {
        let output = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn promql_names_are_told_from_labels_and_functions() {
    assert_eq!(
        metrics_in(
            "sum by (policy) (rate(weft_authorization_decisions_total{decision=\"deny\"}[5m])) > 1 \
             unless on (node) (max by (node) (weft_control_plane_node_pods) > 0) or vector(0) - time()"
        ),
        [
            "weft_authorization_decisions_total",
            "weft_control_plane_node_pods"
        ]
    );
}

/// Loads the dashboard at `hash` in headless Chromium, run in the control
/// plane's node (where its monitoring port is), with `more` arguments;
/// what Chromium printed (the DOM, with `--dump-dom`).
fn browse(testbed: &Testbed, mesh: &WeftMesh, hash: &str, more: &[&str]) -> String {
    let profile = tempfile::tempdir_in(testbed.dir()).unwrap();
    let url = format!(
        "http://127.0.0.1:{}/#{hash}",
        weft_testbed::CONTROL_PLANE_MONITORING_PORT
    );
    let mut command = std::process::Command::new("chromium");
    command
        .args([
            "--headless=new",
            // As root, in a namespace of the test's own: no sandbox.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            // Lets the page's fetches finish and its script draw.
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(more)
        .arg(url);
    let chromium = testbed
        .spawn(
            weft_testbed::Target::Node(mesh.control_plane_node()),
            command,
        )
        .unwrap();
    let status = chromium.wait(Duration::from_secs(120)).unwrap();
    assert!(
        status.success(),
        "chromium: {status}: {}",
        chromium.stderr().unwrap()
    );
    chromium.stdout().unwrap()
}

#[test]
fn the_dashboard_pages_work_in_a_real_browser() {
    let (testbed, mesh, _server) = start();
    traffic_and_a_refusal(&testbed, &mesh);
    wait_until(Duration::from_secs(30), || {
        let traffic = api(&mesh, &testbed, "/api/traffic");
        Ok(edge(&traffic, "batch", "db").is_some() && edge(&traffic, "web", "db").is_some())
    })
    .unwrap();

    // The traffic page: the graph has both workloads and a refused pair;
    // the table names the policy that refused it.
    let dom = browse(&testbed, &mesh, "traffic", &["--dump-dom"]);
    assert!(dom.contains(r#"data-loaded="traffic""#), "{dom}");
    for workload in ["web", "db", "batch"] {
        assert!(
            dom.contains(&format!(r#"data-workload="shop/{workload}"#)),
            "{workload} in the graph: {dom}"
        );
    }
    assert!(
        dom.contains(r#"class="denied""#),
        "a refused pair is drawn: {dom}"
    );
    assert!(dom.contains("by shop/db-from-web"), "{dom}");
    assert!(dom.contains("mTLS") && dom.contains("plaintext"), "{dom}");

    // The nodes page: both nodes, each with its proxy.
    let dom = browse(&testbed, &mesh, "nodes", &["--dump-dom"]);
    assert!(dom.contains(r#"data-loaded="nodes""#), "{dom}");
    assert!(dom.contains("node-1") && dom.contains("node-2"), "{dom}");
    assert!(!dom.contains("no proxy connected"), "{dom}");

    // The policies page shows the policy's conditions.
    let dom = browse(&testbed, &mesh, "policies", &["--dump-dom"]);
    assert!(
        dom.contains("shop/db-from-web") && dom.contains("Accepted: True"),
        "{dom}"
    );

    // The explain form answers as the CLI does.
    for (from, verdict) in [("shop/web", "allowed"), ("shop/batch", "denied")] {
        let dom = browse(
            &testbed,
            &mesh,
            &format!("explain?from={from}&to=shop/db-1:5432"),
            &["--dump-dom"],
        );
        assert!(dom.contains(r#"data-explained="true""#), "{dom}");
        let (report, _) =
            weft_testbed::explain(&mesh, &["--from", from, "--to", "shop/db-1:5432"]).unwrap();
        let shown = dom
            .split(r#"<pre id="explain-report">"#)
            .nth(1)
            .and_then(|rest| rest.split("</pre>").next())
            .unwrap();
        assert_eq!(
            shown,
            report.trim_end_matches('\n').to_owned() + "\n",
            "{dom}"
        );
        assert!(
            dom.contains(&format!(
                r#"class="{}">{verdict}</span>"#,
                if verdict == "allowed" { "yes" } else { "no" }
            )),
            "{verdict}: {dom}"
        );
    }

    // A screenshot of the traffic page: the README's (set
    // WEFT_DASHBOARD_SCREENSHOT to where it goes).
    let screenshot = testbed.dir().join("dashboard.png");
    browse(
        &testbed,
        &mesh,
        "traffic",
        &[
            "--window-size=1280,1100",
            &format!("--screenshot={}", screenshot.display()),
        ],
    );
    let png = std::fs::read(&screenshot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Some(path) = std::env::var_os("WEFT_DASHBOARD_SCREENSHOT") {
        std::fs::write(path, &png).unwrap();
    }
}
