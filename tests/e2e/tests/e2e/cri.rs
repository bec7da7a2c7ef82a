//! capsid as Kubernetes uses it: containerd's CRI plugin with a runtime
//! handler for us, the bridge CNI and a locally made pause image, driven by
//! a CRI client (the kubelet's calls), a runc pod beside ours.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use capsid_e2e::cri::{Cri, Exec};
use capsid_e2e::require_kvm;
use capsid_testbed::containerd::{BUSYBOX, CRI_HANDLER, Containerd, PAUSE, POD_BRIDGE};
use capsid_testbed::netns::link_names;
use k8s_cri::v1::DnsConfig;

/// The script of the web server each pod runs: busybox httpd serving
/// `name` on 8080.
fn web_server(name: &str) -> String {
    format!("mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 8080 -h /www")
}

/// `GET /` on `ip`:8080 from inside container `id`: `wget -q -O - URL`,
/// bounded by ExecSync's timeout (Debian's static busybox wget crashes
/// with `-T`).
fn fetch_in(cri: &Cri, id: &str, ip: &str) -> Exec {
    cri.exec(
        id,
        &["wget", "-q", "-O", "-", &format!("http://{ip}:8080/")],
        60,
    )
}

/// `GET /` on `ip`:8080 from the host, retried until the server answers
/// (at most 60 s); the response.
fn http_get(ip: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = TcpStream::connect_timeout(
            &format!("{ip}:8080").parse().unwrap(),
            Duration::from_secs(5),
        )
        .and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        });
        match answer {
            Ok(response) if response.contains("200 OK") => return response,
            other => assert!(
                Instant::now() < deadline,
                "{ip}:8080 did not answer GET / in 60 s: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The host's network interfaces and the namespaces bound under
/// /var/run/netns (where containerd's CRI puts a pod's).
fn host_network() -> (BTreeSet<String>, BTreeSet<String>) {
    let links = link_names().into_iter().collect();
    let namespaces = std::fs::read_dir("/var/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    (links, namespaces)
}

/// Removes the pods still listed when a test fails half-way, so that it
/// leaves no VM behind for the next test's leak checks.
struct Pods<'a> {
    cri: &'a Cri,
    ids: Vec<String>,
}

impl Drop for Pods<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            self.cri.remove_pod_quietly(id);
        }
    }
}

#[test]
fn a_capsid_pod_through_cri_serves_talks_to_a_runc_pod_and_leaves_nothing() {
    if !require_kvm("a_capsid_pod_through_cri_serves_talks_to_a_runc_pod_and_leaves_nothing") {
        return;
    }
    let (links_before, netns_before) = host_network();
    let containerd = Containerd::start_cri();
    let cri = Cri::connect(&containerd.socket());
    for image in [BUSYBOX, PAUSE] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cri.has_image(image) {
            assert!(Instant::now() < deadline, "CRI never saw {image}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let mut pods = Pods {
        cri: &cri,
        ids: Vec::new(),
    };

    // Our pod: a VM of its own, its sandbox (pause) container first.
    let dns = DnsConfig {
        servers: vec!["10.88.0.53".into()],
        searches: vec!["capsid.test".into()],
        options: vec!["ndots:2".into()],
    };
    let started = Instant::now();
    let pod = cri.run_pod("web", CRI_HANDLER, Some(dns));
    pods.ids.push(pod.clone());
    let booted = started.elapsed();
    let (pod_ip, ready) = cri.pod_ip(&pod);
    assert!(ready, "the capsid pod is not ready");
    assert!(pod_ip.starts_with("10.88."), "capsid pod IP {pod_ip:?}");
    let web = web_server("capsid-pod");
    let server = cri.start_container(&pod, "web", "httpd", BUSYBOX, &["sh", "-c", &web]);
    assert!(
        cri.is_running(&server),
        "{:?}",
        cri.container_status(&server)
    );

    // The guest has the pod's address, hostname and DNS settings.
    let addr = cri.exec(&server, &["ip", "-4", "addr", "show", "eth0"], 60);
    assert_eq!(addr.exit_code, 0, "{addr:?}");
    assert!(addr.stdout.contains(&format!("inet {pod_ip}/")), "{addr:?}");
    let hostname = cri.exec(&server, &["hostname"], 60);
    assert_eq!(hostname.stdout.trim(), "web", "{hostname:?}");
    let resolv = cri.exec(&server, &["cat", "/etc/resolv.conf"], 60);
    for line in [
        "nameserver 10.88.0.53",
        "search capsid.test",
        "options ndots:2",
    ] {
        assert!(resolv.stdout.contains(line), "{line:?} not in {resolv:?}");
    }

    // The pod's IP answers from the host.
    let response = http_get(&pod_ip);
    assert!(response.contains("capsid-pod"), "{response}");

    // Its stats are the guest's, not zero.
    let (cpu_ns, working_set) = cri.container_stats(&server);
    assert!(cpu_ns > 0, "CPU time of a running httpd: {cpu_ns}");
    assert!(
        working_set > 0,
        "working set of a running httpd: {working_set}"
    );

    // A second container joins the pod and shares its network; it has a
    // volume as the kubelet gives a service account's token (a directory
    // of links into a dated directory), copied in.
    let volume = capsid_testbed::ScratchDir::new("capsid-e2e-cri-volume").unwrap();
    let dated = volume.join("..2026_12_02_04_00_00.1");
    std::fs::create_dir(&dated).unwrap();
    std::fs::write(dated.join("token"), "a-token").unwrap();
    std::os::unix::fs::symlink("..2026_12_02_04_00_00.1", volume.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", volume.join("token")).unwrap();
    let token_dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    let client = cri.start_container_with(
        &pod,
        "web",
        "client",
        BUSYBOX,
        &["sleep", "3600"],
        &[(volume.path(), token_dir, true)],
    );
    let local = fetch_in(&cri, &client, "127.0.0.1");
    assert_eq!(local.exit_code, 0, "{local:?}");
    assert!(local.stdout.contains("capsid-pod"), "{local:?}");
    let token = cri.exec(&client, &["cat", &format!("{token_dir}/token")], 30);
    assert_eq!(
        (token.exit_code, token.stdout.as_str()),
        (0, "a-token"),
        "{token:?}"
    );

    // A runc pod on the same bridge; each pod reaches the other over TCP.
    let started = Instant::now();
    let peer = cri.run_pod("peer", "runc", None);
    let runc_booted = started.elapsed();
    pods.ids.push(peer.clone());
    let (peer_ip, _) = cri.pod_ip(&peer);
    let web = web_server("runc-pod");
    let peer_server = cri.start_container(&peer, "peer", "httpd", BUSYBOX, &["sh", "-c", &web]);
    http_get(&peer_ip);
    let to_runc = fetch_in(&cri, &server, &peer_ip);
    assert!(
        to_runc.stdout.contains("runc-pod"),
        "capsid → runc: {to_runc:?}"
    );
    let to_capsid = fetch_in(&cri, &peer_server, &pod_ip);
    assert!(
        to_capsid.stdout.contains("capsid-pod"),
        "runc → capsid: {to_capsid:?}"
    );
    println!(
        "figure: CRI RunPodSandbox: capsid pod {:.2} s (boots its VM), runc pod {:.2} s; \
         pod {pod_ip}, runc pod {peer_ip}",
        booted.as_secs_f64(),
        runc_booted.as_secs_f64()
    );

    // Removed, nothing of either pod is left: no VM, shim, mount, netns,
    // veth (the taps and qdiscs were in the pod's namespace).
    for id in std::mem::take(&mut pods.ids) {
        cri.remove_pod(&id);
    }
    containerd.assert_no_leftovers();
    let (links_after, netns_after) = host_network();
    let new_links: Vec<_> = links_after
        .difference(&links_before)
        .filter(|l| *l != POD_BRIDGE)
        .collect();
    assert!(new_links.is_empty(), "left on the host: {new_links:?}");
    let new_netns: Vec<_> = netns_after.difference(&netns_before).collect();
    assert!(new_netns.is_empty(), "namespaces left: {new_netns:?}");
}
