//! Can this engine reach its hub at all? A hub listening on loopback is
//! reachable only from its own host: an engine elsewhere (a Slurm node,
//! another network namespace) would retry a connection to its own
//! 127.0.0.1 until it times out. That is reported at once instead.

/// The host of a `tcp://HOST` interface.
fn interface_host(interface: &str) -> &str {
    let rest = interface.split_once("://").map_or(interface, |(_, r)| r);
    rest.trim_start_matches('[').trim_end_matches(']')
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

/// An error message when the hub listens on loopback (`interface`) on
/// `location` and this engine runs on another host (`here`).
pub fn loopback_elsewhere(interface: &str, location: &str, here: &str) -> Option<String> {
    let host = interface_host(interface);
    // names compared without their domain and case (`node7` is
    // `Node7.cluster`); an address as location cannot be told apart from
    // one of ours without asking the network, so it is trusted
    let short = |h: &str| h.split('.').next().unwrap_or(h).to_ascii_lowercase();
    if !is_loopback(host)
        || location.is_empty()
        || location.parse::<std::net::IpAddr>().is_ok()
        || short(location) == short(here)
    {
        return None;
    }
    Some(format!(
        "the hub listens on {host} (loopback) on host {location:?}, and this engine runs on \
         {here:?}: it cannot be reached from here. Start the hub with a routable address \
         (`parallax hub --ip=0.0.0.0 --location={location}`, or `parallax cluster start \
         --ip=0.0.0.0`), or pass this engine --controller-ip/--url"
    ))
}

/// This host's name, as the hub writes it into `location`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hub_on_another_host_is_an_error() {
        let e = loopback_elsewhere("tcp://127.0.0.1", "login1", "node7").unwrap();
        assert!(e.contains("127.0.0.1 (loopback) on host \"login1\""), "{e}");
        assert!(e.contains("--ip=0.0.0.0 --location=login1"), "{e}");
        assert!(loopback_elsewhere("tcp://127.0.0.2", "a", "b").is_some());
        assert!(loopback_elsewhere("tcp://localhost", "a", "b").is_some());
        assert!(loopback_elsewhere("tcp://[::1]", "a", "b").is_some());
        // same host, a routable address, or no location: fine
        assert_eq!(
            loopback_elsewhere("tcp://127.0.0.1", "node7", "node7"),
            None
        );
        assert_eq!(
            loopback_elsewhere("tcp://10.0.0.5", "login1", "node7"),
            None
        );
        assert_eq!(loopback_elsewhere("tcp://login1", "login1", "node7"), None);
        assert_eq!(loopback_elsewhere("tcp://127.0.0.1", "", "node7"), None);
        assert_eq!(
            loopback_elsewhere("tcp://127.0.0.1", "Node7.cluster", "node7"),
            None
        );
        assert_eq!(
            loopback_elsewhere("tcp://127.0.0.1", "192.168.1.4", "node7"),
            None
        );
    }
}
