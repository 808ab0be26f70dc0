#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use super::*;

fn value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap()
}

fn parse(text: &str) -> Option<SocketAddr> {
    parse_forwarded(&HeaderValue::from_str(text).ok()?).client
}

#[test]
fn written_forms_read_back() {
    for addr in ["10.0.1.5:43210", "[fd00::5]:80"] {
        let addr: SocketAddr = addr.parse().unwrap();
        assert_eq!(parse_forwarded(&forwarded(addr, None)).client, Some(addr));
        let with_host = forwarded(addr, Some("web.shop.svc.cluster.local"));
        assert_eq!(
            parse_forwarded(&with_host),
            Forwarded {
                client: Some(addr),
                host: Some("web.shop.svc.cluster.local".into())
            }
        );
    }
}

#[test]
fn forwarded_is_what_ztunnel_writes() {
    let addr: SocketAddr = "10.0.1.5:43210".parse().unwrap();
    assert_eq!(
        forwarded(addr, Some("web.shop.svc.cluster.local")),
        "for=\"10.0.1.5:43210\";host=web.shop.svc.cluster.local"
    );
    // A host that would break the header's syntax is not sent.
    assert_eq!(
        forwarded(addr, Some("a;for=1.2.3.4")),
        "for=\"10.0.1.5:43210\""
    );
}

#[test]
fn other_spellings_are_understood() {
    let v4 = |s: &str| s.parse::<SocketAddr>().ok();
    assert_eq!(parse("for=10.0.0.1:80"), v4("10.0.0.1:80"));
    assert_eq!(parse("For=10.0.0.1"), v4("10.0.0.1:0"));
    assert_eq!(parse("for=\"[fd00::1]\""), v4("[fd00::1]:0"));
    assert_eq!(
        parse("proto=http;for=\"10.0.0.2:9\", for=10.0.0.3"),
        v4("10.0.0.2:9")
    );
    assert_eq!(parse("for=unknown"), None);
    assert_eq!(parse("by=10.0.0.1"), None);
    let hosted = parse_forwarded(&value("HOST=\"db.data.svc.cluster.local\" ; for=10.0.0.1"));
    assert_eq!(hosted.host.as_deref(), Some("db.data.svc.cluster.local"));
    assert_eq!(hosted.client, v4("10.0.0.1:0"));
    for bad in [
        "for=10.0.0.1;host=",
        "for=10.0.0.1;host=a b",
        "host=\"x\"y\"",
    ] {
        assert_eq!(parse_forwarded(&value(bad)).host, None, "{bad}");
    }
}

#[test]
fn baggage_is_written_in_ztunnels_order_and_reads_back() {
    let baggage = Baggage {
        cluster: Some("Kubernetes".into()),
        namespace: Some("shop".into()),
        workload: Some("checkout".into()),
        workload_kind: WorkloadKind::Deployment,
        service: Some("checkout".into()),
        revision: Some("v1".into()),
    };
    let header = baggage.header().unwrap();
    assert_eq!(
        header,
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=checkout,\
         service.name=checkout,service.version=v1"
    );
    assert_eq!(Baggage::parse([&header]), baggage);
}

#[test]
fn baggage_leaves_out_what_is_empty_or_unsafe() {
    let baggage = Baggage {
        namespace: Some("shop".into()),
        workload: Some("job-1".into()),
        workload_kind: WorkloadKind::Job,
        service: Some(String::new()),
        revision: Some("a,b=c".into()),
        ..Baggage::default()
    };
    assert_eq!(
        baggage.header().unwrap(),
        "k8s.namespace.name=shop,k8s.job.name=job-1"
    );
    assert_eq!(Baggage::default().header(), None);
}

#[test]
fn baggage_from_other_senders_is_read_leniently() {
    // Envoy's order, spaces, properties, unknown keys, several lines.
    let first = value("k8s.pod.name=web-0 , k8s.namespace.name=shop;prop=1, app.name=web");
    let second = value("service.version=v2,k8s.cluster.name=east,junk,=x,k8s.namespace.name=");
    let parsed = Baggage::parse([&first, &second]);
    assert_eq!(
        parsed,
        Baggage {
            cluster: Some("east".into()),
            namespace: Some("shop".into()),
            workload: Some("web-0".into()),
            workload_kind: WorkloadKind::Pod,
            service: None,
            revision: Some("v2".into()),
        }
    );
    // Another controller's kind names the workload too.
    let stateful = Baggage::parse([&value("k8s.statefulset.name=db")]);
    assert_eq!(stateful.workload.as_deref(), Some("db"));
    // Keys that name something else than the workload do not.
    let others = Baggage::parse([&value(
        "k8s.deployment.name=web,k8s.instance.name=web-5d4f-x2,k8s.node.name=n1,\
         k8s.container.name=app,k8s.name=x",
    )]);
    assert_eq!(others.workload.as_deref(), Some("web"));
    // Values that could smuggle syntax into logs are dropped.
    let hostile = Baggage::parse([&value("k8s.namespace.name=a\"b,service.name=x y")]);
    assert_eq!(hostile, Baggage::default());
}

#[test]
fn baggage_as_istios_proxies_send_it_is_understood() {
    // ztunnel (istio/ztunnel src/baggage.rs) and Envoy waypoints
    // (istio/proxy extensions/common/metadata_object.h) write these keys.
    let ztunnel = value(
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=httpbin,\
         service.name=httpbin,service.version=v1",
    );
    let envoy = value(
        "k8s.deployment.name=httpbin,k8s.namespace.name=default,k8s.cluster.name=Kubernetes,\
         service.name=httpbin,service.version=v1,app.name=httpbin,app.version=v1,\
         k8s.instance.name=httpbin-7b4f9c-x2",
    );
    for sent in [ztunnel, envoy] {
        let parsed = Baggage::parse([&sent]);
        assert_eq!(
            parsed,
            Baggage {
                cluster: Some("Kubernetes".into()),
                namespace: Some("default".into()),
                workload: Some("httpbin".into()),
                workload_kind: WorkloadKind::Deployment,
                service: Some("httpbin".into()),
                revision: Some("v1".into()),
            },
            "{sent:?}"
        );
    }
}

#[test]
fn baggage_reads_a_bounded_number_of_entries() {
    let mut text = "x=1,".repeat(MAX_BAGGAGE_ENTRIES);
    text.push_str("k8s.namespace.name=late");
    assert_eq!(Baggage::parse([&value(&text)]).namespace, None);
}

#[test]
fn a_random_traceparent_is_well_formed_and_reads_back() {
    let trace = TraceParent::random();
    let header = trace.header();
    let text = header.to_str().unwrap();
    assert_eq!(text.len(), 55);
    assert!(text.starts_with("00-") && text.ends_with("-00"));
    assert_eq!(TraceParent::parse(&header), Some(trace));
    assert_eq!(trace.trace_id_hex().len(), 32);
    assert_ne!(TraceParent::random(), trace);
}

#[test]
fn traceparent_is_parsed_strictly() {
    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let parsed = TraceParent::parse(&value(good)).unwrap();
    assert_eq!(parsed.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    assert_eq!(parsed.parent_id, 0x00f067aa0ba902b7);
    assert_eq!(parsed.flags, 1);
    // A later version may add fields.
    assert!(TraceParent::parse(&value(&format!("01{}-extra", &good[2..]))).is_some());
    for bad in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "0-04bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "",
    ] {
        assert_eq!(TraceParent::parse(&value(bad)), None, "{bad}");
    }
}
