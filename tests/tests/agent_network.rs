//! Network configuration through the agent, in the private network
//! namespace the test harness starts it in, on a veth pair (this host's
//! kernel has no dummy driver).

use microvm_proto::agent::v1 as api;
use microvm_tests::agent::AgentUnderTest;
use tonic::Code;

const MAC: &str = "02:00:00:aa:bb:01";

fn ok<T>(agent: &AgentUnderTest, result: Result<T, tonic::Status>) -> T {
    result.unwrap_or_else(|status| panic!("{status:?}\nagent log:\n{}", agent.log_text()))
}

fn ip(agent: &AgentUnderTest, args: &[&str]) -> String {
    let mut command = vec!["ip"];
    command.extend_from_slice(args);
    let output = agent.nsenter(&["net"], &command);
    assert!(
        output.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// tmp0 (our MAC) and its peer tmp1, the peer up so tmp0 gets a carrier.
fn add_veth(agent: &AgentUnderTest) {
    ip(
        agent,
        &[
            "link", "add", "tmp0", "address", MAC, "type", "veth", "peer", "name", "tmp1",
        ],
    );
    ip(agent, &["link", "set", "tmp1", "up"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interface_routes_and_neighbours_are_configured() {
    let agent = AgentUnderTest::start("net");
    add_veth(&agent);
    let mut client = agent.client().await;

    let response = ok(
        &agent,
        client
            .network
            .update_interface(api::UpdateInterfaceRequest {
                mac: MAC.into(),
                name: "eth0".into(),
                addresses: vec!["10.1.0.2/24".into(), "fd00::2/64".into()],
                mtu: 1400,
                up: true,
            })
            .await,
    )
    .into_inner();
    assert_eq!(response.name, "eth0");
    assert!(response.index > 0);
    let link = ip(&agent, &["-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400"), "{link}");
    assert!(link.contains(",UP") || link.contains("<UP"), "{link}");
    let addresses = ip(&agent, &["-o", "addr", "show", "dev", "eth0"]);
    assert!(addresses.contains("inet 10.1.0.2/24"), "{addresses}");
    assert!(addresses.contains("inet6 fd00::2/64"), "{addresses}");
    // Again: idempotent.
    ok(
        &agent,
        client
            .network
            .update_interface(api::UpdateInterfaceRequest {
                mac: MAC.into(),
                name: "eth0".into(),
                addresses: vec!["10.1.0.2/24".into()],
                mtu: 0,
                up: true,
            })
            .await,
    );

    ok(
        &agent,
        client
            .network
            .update_routes(api::UpdateRoutesRequest {
                routes: vec![
                    api::Route {
                        destination: "10.2.0.0/16".into(),
                        device: "eth0".into(),
                        metric: 50,
                        ..api::Route::default()
                    },
                    api::Route {
                        destination: "default".into(),
                        gateway: "10.1.0.1".into(),
                        device: "eth0".into(),
                        ..api::Route::default()
                    },
                ],
            })
            .await,
    );
    let routes = ip(&agent, &["route", "show"]);
    assert!(routes.contains("default via 10.1.0.1 dev eth0"), "{routes}");
    assert!(
        routes.contains("10.2.0.0/16 dev eth0") && routes.contains("metric 50"),
        "{routes}"
    );

    ok(
        &agent,
        client
            .network
            .add_neighbors(api::AddNeighborsRequest {
                neighbors: vec![api::Neighbor {
                    ip: "10.1.0.1".into(),
                    mac: "02:00:00:aa:bb:ff".into(),
                    device: "eth0".into(),
                }],
            })
            .await,
    );
    let neighbours = ip(&agent, &["neigh", "show", "dev", "eth0"]);
    assert!(
        neighbours.contains("10.1.0.1 lladdr 02:00:00:aa:bb:ff PERMANENT"),
        "{neighbours}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_network_requests_are_refused_by_name() {
    let agent = AgentUnderTest::start("badnet");
    add_veth(&agent);
    let mut client = agent.client().await;
    let unknown = client
        .network
        .update_interface(api::UpdateInterfaceRequest {
            mac: "02:00:00:00:00:99".into(),
            up: true,
            ..api::UpdateInterfaceRequest::default()
        })
        .await
        .expect_err("no such MAC");
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains("02:00:00:00:00:99"),
        "{unknown:?}"
    );
    let bad_cidr = client
        .network
        .update_interface(api::UpdateInterfaceRequest {
            mac: MAC.into(),
            addresses: vec!["10.1.0.2/40".into()],
            ..api::UpdateInterfaceRequest::default()
        })
        .await
        .expect_err("bad prefix");
    assert_eq!(bad_cidr.code(), Code::InvalidArgument);
    let bad_mac = client
        .network
        .update_interface(api::UpdateInterfaceRequest {
            mac: "zz".into(),
            ..api::UpdateInterfaceRequest::default()
        })
        .await
        .expect_err("bad MAC");
    assert_eq!(bad_mac.code(), Code::InvalidArgument);
    let no_device = client
        .network
        .update_routes(api::UpdateRoutesRequest {
            routes: vec![api::Route {
                destination: "10.9.0.0/16".into(),
                device: "nope0".into(),
                ..api::Route::default()
            }],
        })
        .await
        .expect_err("no such device");
    assert_eq!(no_device.code(), Code::NotFound);
    assert!(no_device.message().contains("nope0"), "{no_device:?}");
    let bad_neighbour = client
        .network
        .add_neighbors(api::AddNeighborsRequest {
            neighbors: vec![api::Neighbor {
                ip: "not-an-ip".into(),
                mac: MAC.into(),
                device: "tmp0".into(),
            }],
        })
        .await
        .expect_err("bad IP");
    assert_eq!(bad_neighbour.code(), Code::InvalidArgument);
    // Still serving.
    ok(
        &agent,
        client
            .network
            .update_interface(api::UpdateInterfaceRequest {
                mac: MAC.into(),
                up: true,
                ..api::UpdateInterfaceRequest::default()
            })
            .await,
    );
}
